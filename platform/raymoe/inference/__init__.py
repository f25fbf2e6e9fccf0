"""raymoe.inference: how a built model runs fast, applied from outside the model.

cpu_threads (threads the layers share) -> fast_attention (fused q/k/v, decode attention over
threads) -> packed (oneDNN fp32 weights) / quantize (INT8 weights) -> forward_jobs (one engine
step's forwards in one pass over the weights). Imports torch and `raymoe.models`, nothing above.
"""
