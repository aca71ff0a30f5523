"""Flamingo / VisionCrossAttentionMask: text tokens attend to the images before them.

Cross attention, so Q_LEN (text tokens) differs from KV_LEN (image tokens).
`intervals[i] = [start, end)` is the range of text tokens that see image i;
`image_boundaries[kv]` is the image that key token kv belongs to. The seed:
12 text tokens, 3 images of 3 tokens, intervals [[0, 7], [1, 7], [7, 12]].
A captured array is indexed twice: `intervals[image_boundaries[kv_idx]][0]`.
"""

import jax.numpy as jnp


def generate_vision_cross_attention_mask(intervals, image_token_lengths):
    """mask_mod for text x image-token attention. intervals: [n_images, 2]; one length per image."""
    intervals = jnp.asarray(intervals, jnp.int32)
    if intervals.ndim != 2 or intervals.shape[1] != 2:
        raise ValueError(f"intervals must be [n_images, 2], got shape {intervals.shape}")
    lengths = [int(n) for n in image_token_lengths]
    if len(lengths) != intervals.shape[0]:
        raise ValueError(
            f"image_token_lengths needs one length per interval ({intervals.shape[0]}), "
            f"got {len(lengths)}"
        )
    image_boundaries = jnp.repeat(jnp.arange(len(lengths), dtype=jnp.int32), jnp.asarray(lengths))

    def vision_x_attention(b, h, q_idx, kv_idx):
        image_idx = image_boundaries[kv_idx]
        interval = intervals[image_idx]
        return (q_idx >= interval[0]) & (q_idx < interval[1])

    return vision_x_attention
