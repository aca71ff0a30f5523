"""Neighborhood attention (NATTEN): a fixed K_H x K_W kernel over a flattened image.

The kernel is centred on the query where it can be, but its centre is clamped
to stay `kernel // 2` pixels inside the canvas, so every query sees exactly
K_H * K_W keys. The seed: 128x128 image, 7x7 kernel. (The seed's clamp uses W
for x and H for y; with its square canvas the two agree.)
"""

import jax.numpy as jnp


def generate_natten(canvas_w: int, canvas_h: int, kernel_w: int, kernel_h: int):
    def natten(b, h, q_idx, kv_idx):
        q_x, q_y = q_idx // canvas_w, q_idx % canvas_w
        kv_x, kv_y = kv_idx // canvas_w, kv_idx % canvas_w
        kernel_x = jnp.clip(q_x, kernel_w // 2, (canvas_w - 1) - kernel_w // 2)
        kernel_y = jnp.clip(q_y, kernel_h // 2, (canvas_h - 1) - kernel_h // 2)
        hori = abs(kernel_x - kv_x) <= kernel_w // 2
        vert = abs(kernel_y - kv_y) <= kernel_h // 2
        return hori & vert

    natten.__qualname__ = f"natten_{canvas_w}x{canvas_h}_k{kernel_w}x{kernel_h}"
    return natten
