"""``slicefield demo``: the MNI152 template from nilearn's wheel -> three orthogonal x4 stacks -> every method."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

#: Methods the demo runs unless told otherwise: the classical pair, a few minutes on 2 cores. The neural-field
#: method (``--methods bspline,srr,inr``: srr + self-supervised restoration, +0.66 dB over srr on this MNI152 case)
#: adds about 2.5 minutes on 2 cores, so it is opt-in.
DEMO_METHODS = ("bspline", "srr")
#: Seconds the demo gives the inr fit when asked for (warm start included; the whole fit took 159-191 s here).
DEMO_INR_BUDGET_S = 200.0


def run_demo(*, out_dir: Path, reporter, methods: str | None = None) -> int:
    """Run the demo into the run directory ``out_dir``; prints the table and the report path."""
    from .acquisition.simulate import SimulationConfig
    from .benchmark import BenchmarkConfig, format_table, run_benchmark
    from .data import mni152_t1_path
    from .errors import SlicefieldError
    from .io import load_volume
    from .reconstruct import METHODS, ReconstructConfig
    from .report import make_figures, save_benchmark, write_report
    from .runs import RunDir

    chosen = DEMO_METHODS if methods is None else tuple(m.strip() for m in methods.split(",") if m.strip())
    unknown = sorted(set(chosen) - set(METHODS))
    if unknown:
        raise SlicefieldError(f"unknown --methods {', '.join(unknown)}", fix=f"use some of {', '.join(METHODS)}")
    source = mni152_t1_path()
    reference = load_volume(source)
    # the demo bounds the neural-field fit so the whole demo stays within a few minutes on 2 cores
    recon = ReconstructConfig(inr=replace(ReconstructConfig().inr, time_budget_s=DEMO_INR_BUDGET_S))
    config = BenchmarkConfig(methods=chosen, simulation=SimulationConfig(), reconstruct=recon)
    run = RunDir.create(
        out_dir, config={"kind": "demo", "reference": str(source), "benchmark": config}, command=sys.argv
    )
    sim = config.simulation
    reporter.info(
        f"slicefield demo: MNI152 T1 {reference.shape} at 1 mm, from nilearn's wheel\n"
        f"  -> {len(sim.orientations)} orthogonal stacks, {sim.thickness:g} mm slices, Gaussian PSF, "
        f"{sim.noise:.0%} noise -> {', '.join(chosen)}"
    )
    with run, reporter.steps() as step:
        result = run_benchmark(reference, config=config, progress=step)
        save_benchmark(run, result, reference=reference)
        with run.timed("figures"):
            make_figures(run.path)
        report = write_report(run.path, title="slicefield demo: MNI152, three orthogonal x4 stacks")
    print(format_table(result.rows))
    print(f"report: {report.resolve()}")  # on stdout, beside the table: shown even with --quiet
    return 0
