"""compression_report.json and its readable .md twin."""
from __future__ import annotations

import json
import resource
from pathlib import Path

import psutil


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def layer_entry(layer: int, stats, measured) -> dict:
    """A merged layer's report entry (`measured`: methods.output_error.Measured)."""
    result = measured.result
    return {
        "layer": layer,
        "num_experts": len(result.experts),
        "expert_map": result.expert_map,
        "clusters": result.clusters,
        "frequency": [round(f, 5) for f in stats.frequency.tolist()],
        "moe_output_relative_error": measured.output_error,
        # top-k slots served by a merged expert the token already reaches (computed twice by the kernel)
        "duplicate_slot_rate": round(measured.duplicate_slots, 5),
        "seconds": round(measured.seconds, 2),
        "representatives": result.representatives,
        "merge": [m.report() for m in result.merges],
        **({"grouping": result.grouping.chosen_by, "held_out_error_by_grouping": result.grouping.held_out_errors}
           if result.grouping is not None and result.grouping.chosen_by else {}),
        **({"refinement": result.refinement} if result.refinement else {}),
        **({"constant_experts": result.constant} if result.constant else {}),
        **({"correction_norms": [round(v, 5) for v in result.correction.norm(dim=-1).tolist()]}
           if result.correction is not None else {}),
    }


def build(opts, method, calib_info: dict, layers: list[dict], experts_per_layer: list[int], source_bytes: int,
          out_bytes: int,
          n_src: int, seconds: float, peak_rss: int, rss_before_weights: int, written_bytes: int) -> dict:
    """`out_bytes`: the weights the output serves; `written_bytes`: those it stores (less for a profile)."""
    return {
        "method": opts.method,
        "method_description": method.description,
        "settings": {"num_experts": opts.num_experts, "seed": opts.seed, "device": opts.device, "export": opts.export,
                     "expert_output_tokens": calib_info["output_tokens"], "refine_steps": opts.refine_steps,
                     "correct": opts.correct,
                     **method.settings()},
        "source": {"path": str(opts.model), "num_experts": n_src, "weight_bytes": source_bytes},
        "calibration": calib_info,
        "sizes": {"source_weight_bytes": source_bytes, "weight_bytes": out_bytes,
                  "compression_ratio": source_bytes / out_bytes, "written_bytes": written_bytes,
                  "experts_per_layer": experts_per_layer},  # 0: a layer without routed experts
        "time_seconds": round(seconds, 2),
        "reduce_seconds": round(sum(l["seconds"] for l in layers), 2),  # grouping, merging, refining
        "peak_rss_bytes": peak_rss,
        "rss_before_weights_bytes": rss_before_weights,  # of this run's process (a resumed run: its own)
        "layers": layers,
    }


def choice_summary(c: dict) -> str:
    """`--choose-end-to-end`'s outcome (the report's `end_to_end_choice`), for the report and the model card."""
    return (f"the `{c['chosen']}` fit of W_D kept (function weight {c['function_weight']:g}); KL per token against "
            f"the source on {c['tokens']} tokens of calibration text the calibration did not draw: "
            + ", ".join(f"{n} {v:.5f}" for n, v in c["kl"].items()))


def to_markdown(r: dict) -> str:
    s = r["sizes"]
    distilled = f", distillation {r['distillation']['seconds']:.1f} s" if "distillation" in r else ""
    lines = [
        f"# Compression report: {r['method']}",
        "",
        f"{r['method_description']}.",
        "",
        f"- source: `{r['source']['path']}` ({r['source']['num_experts']} experts per layer)",
        "- settings: " + ", ".join(f"{k}={v}" for k, v in r["settings"].items()),
        f"- calibration: {r['calibration']['samples']} windows x {r['calibration']['seq_len']} tokens "
        f"({r['calibration']['tokens']} tokens) from " + ", ".join(r["calibration"]["sources"]),
        f"- weights: {s['source_weight_bytes'] / 1e6:.2f} MB -> {s['weight_bytes'] / 1e6:.2f} MB "
        f"(ratio {s['compression_ratio']:.3f})" + (
            f"; {s['written_bytes'] / 1e6:.2f} MB written, the rest read from the source when served (a profile)"
            if s.get("written_bytes", s["weight_bytes"]) != s["weight_bytes"] else ""),
        f"- time: {r['time_seconds']:.1f} s (calibration {r['calibration'].get('seconds', 0):.1f} s, "
        f"merging {r['reduce_seconds']:.1f} s{distilled}), peak resident memory {r['peak_rss_bytes'] / 2**20:.0f} MiB "
        f"({r['rss_before_weights_bytes'] / 2**20:.0f} MiB before any weight was read: libraries, tokenizer, "
        f"calibration tokens)",
    ]
    if "end_to_end_choice" in r:
        lines.append(f"- end-to-end choice: {choice_summary(r['end_to_end_choice'])} "
                     f"({r['end_to_end_choice']['seconds']:.1f} s)")
    lines += [
        "",
        "| layer | experts | expert map | routing frequency | MoE output rel. error |",
        "|---:|---:|---|---|---:|",
    ]
    for l in r["layers"]:
        freq = " ".join(f"{f:.3f}" for f in l["frequency"])
        lines.append(f"| {l['layer']} | {l['num_experts']} | {l['expert_map']} | {freq} | "
                     f"{l['moe_output_relative_error']:.4f} |")
    intra = [(l["layer"], c) for l in r["layers"] for c in l["merge"] if "gate_intra_error" in c]
    if intra:
        lines += ["", "Sub-MoE† intra-expert low rank (whitened by routed tokens; written dense, so memory "
                  "is unchanged until served as factors): rank / relative output error per matrix", "",
                  "| layer | members | W_G | W_U | W_D |", "|---:|---|---|---|---|"]
        for layer, c in intra:
            cells = [f"{c[f'{m}_intra_rank']} / {c[f'{m}_intra_error']:.4f}" for m in ("gate", "up", "down")]
            lines.append(f"| {layer} | {c['members']} | " + " | ".join(cells) + " |")
    trunc = [(l["layer"], c) for l in r["layers"] for c in l["merge"] if "gate_truncation_error" in c]
    if trunc:
        lines += ["", "Per-matrix rank and relative truncation error of each merged expert:", "",
                  "| layer | members | W_G rank / err | W_U rank / err | W_D rank / err |", "|---:|---|---|---|---|"]
        for layer, c in trunc:
            cells = [f"{c[f'{m}_rank']} / {c[f'{m}_truncation_error']:.4f}" for m in ("gate", "up", "down")]
            lines.append(f"| {layer} | {c['members']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(report: dict, out_dir: Path) -> None:
    (out_dir / "compression_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "compression_report.md").write_text(to_markdown(report))
