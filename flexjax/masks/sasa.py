"""Stand-alone self-attention (SASA): a 2-D window over a flattened image.

Token i is pixel (i // W, i % W) of an image W pixels wide; a query sees the
keys within `window` pixels along both axes. The seed: 128x128 image, window 8.
"""


def generate_sasa_mask_mod(canvas_w: int, window: int):
    def sasa(b, h, q_idx, kv_idx):
        q_x, q_y = q_idx // canvas_w, q_idx % canvas_w
        kv_x, kv_y = kv_idx // canvas_w, kv_idx % canvas_w
        return (abs(q_x - kv_x) <= window) & (abs(q_y - kv_y) <= window)

    sasa.__qualname__ = f"sasa_w{canvas_w}_win{window}"
    return sasa
