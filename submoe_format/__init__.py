"""The contract between the compressor and the server: what a compressed checkpoint is.

    families     the supported MoE architectures, one data entry each
    checkpoint   the `submoe` block in config.json (expert remap tables) and the expert tensors' names
    check        the checks `vllm serve` and `submoe check` run on a checkpoint's files
    texts        the calibration and evaluation text files both sides read
    errors       the base class of every error a user can fix

The bottom layer: `offline` (writes checkpoints), `vllm_submoe` (serves them) and `serving` (load
tests them) import it; it imports none of them, nor torch, nor vLLM, so it loads anywhere.
"""
