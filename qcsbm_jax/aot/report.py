"""A job report as a terminal table and as JSON."""

import dataclasses

from qcsbm_jax.aot.check import JobReport, ProgramReport
from qcsbm_jax.aot.targets import GiB


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s:.3g} s" if s >= 1e-3 else f"{s * 1e3:.3g} ms"


def _row(p: ProgramReport) -> list[str]:
    m = p.memory
    nfe = f" x {p.repeats:g}{' (assumed NFE)' if p.nfe_assumed else ''}" if p.kind in (
        "sample", "likelihood") else ""
    gib = lambda b: f"{b / GiB:.3g}"
    return [p.name, f"{p.batch} ({p.batch_per_device:g}/dev)", gib(m.arguments),
            gib(m.outputs), gib(m.aliased), gib(m.temporaries),
            f"{gib(m.total)} / {p.capacity / GiB:.1f}",
            "yes" if p.fits else "NO", f"{p.work.flops / 1e12:.3g}{nfe}",
            f"{p.work.bytes_accessed / 1e9:.3g}",
            "-" if p.xla_seconds is None else _seconds(p.xla_seconds),
            _seconds(p.roofline_seconds), f"{p.examples_per_second:.3g}"]


HEADER = ["program", "batch", "args GiB", "out GiB", "aliased GiB", "temp GiB",
          "total / usable GiB", "fits", "TFLOP/call", "GB/call", "XLA est./call",
          "roofline/call", "examples/s"]


def table(job: JobReport) -> str:
    rows = [HEADER] + [_row(p) for p in job.programs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    lines = [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += [line(r) for r in rows[1:]]
    t, chip = job.target, job.target.chip
    lines.append(f"Per device of {t.name}: {t.num_chips} x {chip.name}, {t.num_hosts} "
                 f"host(s). Times are estimates: XLA's cost model (TPU) and a roofline at "
                 f"{chip.peak_flops['float32'] / 1e12:g} (float32) / "
                 f"{chip.peak_flops['bfloat16'] / 1e12:g} (bfloat16) TFLOP/s and "
                 f"{chip.bandwidth / 1e9:g} GB/s; examples/s uses XLA's estimate where given.")
    train = job.training_seconds()
    if train:
        lines.append(f"Training ({sum(p.calls or 0 for p in job.programs if p.kind == 'train')}"
                     f" steps): about {_seconds(train)} on the slice, "
                     f"{job.chip_hours():.0f} chip-hours (estimate).")
    if job.fit is not None:
        f = job.fit
        state = "verified by a compile" if f.verified else "estimated from two compiles"
        lines.append(f"Largest training batch per device that fits: {f.per_device_batch} "
                     f"({state}; {f.bytes_per_example / 2**20:.0f} MiB per example, "
                     f"{f.fixed_bytes / GiB:.2f} GiB fixed).")
    if not job.fits:
        lines.append("DOES NOT FIT: " + "; ".join(
            f"{p.name} needs {p.memory.total / GiB:.2f} GiB of {p.capacity / GiB:.2f} GiB"
            for p in job.programs if not p.fits) + ".")
        if job.fit is not None and job.fit.suggestions:
            lines.append("Settings that would fit: " + "; ".join(job.fit.suggestions) + ".")
    return "\n".join(lines)


def as_json(job: JobReport) -> dict:
    programs = []
    for p in job.programs:
        entry = {k: v for k, v in dataclasses.asdict(p).items() if k not in ("memory", "work")}
        entry.update(memory=dataclasses.asdict(p.memory), memory_total=p.memory.total,
                     fits=p.fits, flops=p.work.flops, bytes_accessed=p.work.bytes_accessed,
                     estimated_seconds=p.seconds, examples_per_second=p.examples_per_second)
        programs.append(entry)
    t = job.target
    return {"config": job.config_name, "target": t.name, "chip": t.chip.name,
            "num_chips": t.num_chips, "num_hosts": t.num_hosts, "fits": job.fits,
            "programs": programs,
            "training_seconds_estimate": job.training_seconds(),
            "chip_hours_estimate": job.chip_hours(),
            "fit": None if job.fit is None else dataclasses.asdict(job.fit),
            "note": "Compiler estimates without a device: no autotuning, no measured time."}
