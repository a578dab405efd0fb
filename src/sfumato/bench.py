"""`sfumato bench ...`: every figure this project reports comes from one of these commands."""

from __future__ import annotations

import click

from sfumato.cli import LazyGroup

BENCHMARKS = {
    "adherence": "sfumato.world.adherence:adherence_command",
    "analyzer": "sfumato.world.analyzer:analyzer_command",
    "render": "sfumato.world.cli:render_bench_command",
    "speed": "sfumato.speed:speed_command",
    "load": "sfumato.server.loadbench:load_command",
    "lora": "sfumato.train.lora_bench:lora_bench_command",
}


@click.group(cls=LazyGroup, lazy=BENCHMARKS)
def bench() -> None:
    """Benchmarks: prompt adherence, speed, server load, LoRA teaching."""
