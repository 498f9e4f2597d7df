"""Custom Pallas kernels: the fused 4-bit / 8-bit dequantize + matmul + LoRA product (`quant_matmul`)
and its per-shape tile table (`tiles`). Reached through the one linear op (`jaxtune.quant.matmul`),
chosen by ``quant.kernel``; tested on any machine in Pallas' interpreter."""
