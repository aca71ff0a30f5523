"""Warp specialisation shared by the Mosaic GPU kernels: a producer warpgroup filling a ring.

The kernels run `consumers` warpgroups of math (most registers) and one
producer warpgroup (few registers) that TMA-copies each step's tiles into a
`stages`-deep shared-memory ring, refilling a slot once every consumer has
released it (arrived on the slot's `consumed` barrier).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

__all__ = ["Turns", "producer_ring", "register_split", "release", "roles"]

PRODUCER_REGISTERS = 40
CONSUMER_REGISTERS = 232
_MIN_PRODUCER = 24  # setmaxnreg's floor


def _launch_registers(warpgroups: int) -> int:
    """Registers per thread summed over the CTA's warpgroups, as launched: the 65536 of an
    SM split evenly, per thread a multiple of 8 (3 warpgroups: 168 each, 504, not 512)."""
    return 65536 // (128 * warpgroups) // 8 * 8 * warpgroups


def register_split(consumers: int, consumer_registers: int) -> tuple[int, int]:
    """(producer, consumer) registers per thread: the consumers' count as asked, the producer
    what is left of the launch's registers (at most PRODUCER_REGISTERS; 240 with two
    consumers leaves it 24, FlashAttention-3's split). setmaxnreg.inc waits until the others'
    setmaxnreg.dec free enough: asking more than the launch holds hangs the kernel, so this
    raises instead."""
    total = _launch_registers(consumers + 1)
    producer = min(PRODUCER_REGISTERS, total - consumers * consumer_registers)
    if consumer_registers % 8 or not 64 <= consumer_registers <= 256 or producer < _MIN_PRODUCER:
        top = (total - _MIN_PRODUCER) // consumers // 8 * 8
        raise ValueError(
            f"consumer registers={consumer_registers}: expected a multiple of 8 from 64 to "
            f"{min(top, 256)} (with {consumers} consumer warpgroups the producer keeps at least "
            f"{_MIN_PRODUCER}); the default is {CONSUMER_REGISTERS}"
        )
    return producer, consumer_registers


def roles(
    consumers: int, interpret: bool, producer, consumer, consumer_registers=CONSUMER_REGISTERS
) -> None:
    """Run `producer()` on warpgroup `consumers` and `consumer()` on warpgroups below it,
    with registers moved from the one to the others on the GPU (`register_split`)."""
    wg = lax.axis_index("wg")
    keep, grow = register_split(consumers, consumer_registers)

    @pl.when(wg == consumers)
    def _producer():
        if not interpret:
            plgpu.set_max_registers(keep, action="decrease")
        producer()

    @pl.when(wg < consumers)
    def _consumer():
        if not interpret:
            plgpu.set_max_registers(grow, action="increase")
        consumer()


def release(consumed, staged: bool) -> None:
    """Arrive on a ring slot's `consumed` barrier; with staged slices read from the slot,
    first order those ordinary shared-memory reads before the TMA that refills it
    (fence.proxy.async: jax 0.11's interpreter checks it)."""
    if staged:
        plgpu.commit_smem()
    plgpu.barrier_arrive(consumed)


class Turns:
    """Two consumers' ping-pong on a barrier of 2 arrivals (`bar`; None: a no-op).

    `turn()` is a rendezvous (`arrive()` then `wait()`, which a kernel may split
    to do work between them). Consumer 1 takes one before its first step and
    consumer 0 one after its last (`start()`, `end()`), so each step's turns
    pair one consumer's issued matmuls with the other's elementwise work.
    """

    def __init__(self, bar, wg):
        self.bar, self.wg = bar, wg

    @staticmethod
    def scratch(enabled: bool):
        """The barrier `bar` of a kernel's scratch: 2 arrivals (None when not `enabled`)."""
        return plgpu.Barrier(num_arrivals=2, num_barriers=1) if enabled else None

    def arrive(self):
        if self.bar is not None:
            plgpu.barrier_arrive(self.bar.at[0])

    def wait(self):
        if self.bar is not None:
            plgpu.barrier_wait(self.bar.at[0])

    def turn(self):
        self.arrive()
        self.wait()

    def start(self):
        if self.bar is not None:
            pl.when(self.wg == 1)(self.turn)

    def end(self):
        if self.bar is not None:
            pl.when(self.wg == 0)(self.turn)


def producer_ring(n, stages: int, parts, interpret: bool) -> None:
    """Fill a `stages`-deep ring with steps 0..n-1. parts: (copy, consumed) pairs, the pieces
    of a step (one, or K then V) each with its own release barrier: copy(j, slot) once the
    slot's `consumed` says its previous tile was read, so K's slot can refill while V's is
    still being read."""

    def fill(i):
        @pl.when(i < n)
        def _():
            for copy, _ in parts:
                copy(i, i)

    for i in range(stages):
        fill(i)

    def refill(j, _):
        slot = lax.rem(j, stages)
        for copy, consumed in parts:
            plgpu.barrier_wait(consumed.at[slot])
            copy(j, slot)

    lax.fori_loop(stages, jnp.maximum(n, stages), refill, None)
    if interpret:  # observe the last releases (the interpreter checks every phase is seen)

        def drain(j, _):
            for _, consumed in parts:
                plgpu.barrier_wait(consumed.at[lax.rem(j, stages)])

        lax.fori_loop(jnp.maximum(n - stages, 0), n, drain, None)
