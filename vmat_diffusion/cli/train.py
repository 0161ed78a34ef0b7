"""``vmat-train``: train the baseline U-Net or the diffusion model on a folder of case files.

    vmat-train --data_dir cases/ --epochs 200                      # BaselineUNet3D (primary model)
    vmat-train --data_dir cases/ --model ddpm --exp_name ddpm_v1   # SimpleUNet3D + DDPM
    vmat-train --data_dir cases/ --resume runs/vmat_dose/checkpoints/last.ckpt
    vmat-train --data_dir cases/ --devices 4 --strategy ddp        # 4 GPUs through torchrun

With ``--resume`` every setting not given on the command line comes from the checkpoint (run
folder, epochs, patch size, learning rate, ...), except the machine's: ``INVOCATION_SETTINGS``
(device, devices, workers, time budget, cooling, progress) come from this command line.

Outputs go to ``<log_dir>/<exp_name>/`` (training_config.json, epoch_metrics.csv,
training_summary.json, TensorBoard events, checkpoints/). Flags and defaults follow the
training guide; ``--use_simple_unet`` is accepted for its command lines (SimpleUNet3D is the only
diffusion backbone). ``--devices N --strategy ddp`` outside torchrun prints the torchrun line and
runs it on this machine (``--num_nodes M > 1``: prints the per-machine line and exits).

Exit codes: 0 done (also after early stopping); 1 stopped by a non-finite loss or gradient; 2 bad input
(flag value, data folder, case file, checkpoint); 17 only from the test hook
``VMAT_TEST_EXIT_AFTER_EPOCH``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Set

from ..case import CaseFormatError
from ..devices import check_processes_fit
from ..training import distributed as dist_utils
from ..training.checkpoint import CheckpointError, load_checkpoint
from ..training.config import LOSSES, MODELS, PRECISIONS, PRECISION_ALIASES, SCHEDULES, STRATEGIES, TrainConfig
from ..training.run_logs import refuse_earlier_run

PROG = "vmat-train"


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog=PROG, description="Train a 3-D dose-prediction model (baseline U-Net or DDPM).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data_dir", required=True, help="folder of case .npz files")
    data.add_argument("--val_split", type=float, default=d.val_split, help="fraction of cases for validation")
    data.add_argument("--test_split", type=float, default=d.test_split, help="fraction of cases held out for testing")
    data.add_argument("--val_dir", default=d.val_dir,
                      help="folder of validation cases (instead of drawing --val_split of --data_dir)")
    data.add_argument("--val_ids", nargs="+", default=None, metavar="CASE_ID",
                      help="case ids in --data_dir to validate on (instead of drawing --val_split); "
                           "commas also separate ids")
    data.add_argument("--patch_size", type=int, default=d.patch_size, help="cubic training patch size (voxels)")
    data.add_argument("--patches_per_volume", type=int, default=d.patches_per_volume,
                      help="patches drawn from each case per epoch")
    data.add_argument("--num_workers", type=int, default=d.num_workers, help="DataLoader worker processes")
    data.add_argument("--rx_dose_gy", type=float, default=d.rx_dose_gy,
                      help="dose scale (Gy): the baseline regresses dose / rx_dose_gy")
    data.add_argument("--no_augment", dest="augment", action="store_false",
                      help="turn off the left-right flips and translations (augment=%(default)s unless given)")
    data.add_argument("--augment", dest="augment", action="store_true", default=argparse.SUPPRESS,
                      help="turn them on (the default; for --resume of a run trained with --no_augment)")
    data.add_argument("--cache_cases", action="store_true", help="keep the training and validation cases in RAM")
    data.add_argument("--store", dest="use_store", action="store_true",
                      help="read cases memory-mapped through the case store (built on first use)")

    model = p.add_argument_group("model")
    model.add_argument("--model", choices=MODELS, default=d.model,
                       help="baseline: BaselineUNet3D regressing dose/Rx; ddpm: SimpleUNet3D noise predictor")
    model.add_argument("--base_channels", type=int, default=d.base_channels, help="channels of the first U-Net level")
    model.add_argument("--levels", type=int, default=d.levels, help="U-Net levels (patch_size must divide by 2**(levels-1))")
    model.add_argument("--timesteps", type=int, default=d.timesteps, help="diffusion timesteps (ddpm)")
    model.add_argument("--schedule", choices=SCHEDULES, default=d.schedule, help="noise schedule (ddpm)")
    model.add_argument("--use_simple_unet", action="store_true", default=True,
                       help="accepted for the guide's command lines; SimpleUNet3D is always the diffusion backbone")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=d.epochs, help="maximum epochs")
    opt.add_argument("--batch_size", type=int, default=d.batch_size, help="patches per micro-batch (per process)")
    opt.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate")
    opt.add_argument("--min_lr", type=float, default=d.min_lr, help="end of the cosine decay")
    opt.add_argument("--weight_decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    opt.add_argument("--warmup_epochs", type=float, default=d.warmup_epochs, help="linear LR warmup (epochs)")
    opt.add_argument("--accumulate_grad_batches", type=int, default=d.accumulate_grad_batches,
                     help="micro-batches per optimizer step")
    opt.add_argument("--gradient_clip", type=float, default=d.gradient_clip, help="gradient-norm clip")
    opt.add_argument("--penalty_weight", type=float, default=d.penalty_weight, help="negative-dose penalty weight")
    opt.add_argument("--loss", choices=LOSSES, default=d.loss,
                     help="data term: mse (the guide's) or l1 (mean absolute error; baseline: dose/Rx, ddpm: noise)")
    opt.add_argument("--loss_mask", default=d.loss_mask, metavar="EXTRA", type=_none_or_name,
                     help="average the data term over the voxels inside this case extra only, e.g. "
                          "possible_dose_mask (OpenKBP); every case must have it. Default (or 'none'): all voxels")
    opt.add_argument("--precision", choices=list(PRECISIONS) + list(PRECISION_ALIASES), default=d.precision,
                     help="auto: bf16 on GPUs with bf16 and on CPUs with AMX, fp16+GradScaler on older GPUs, "
                          "fp32 otherwise")
    opt.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                     help="EMA of the weights for validation and checkpoints (default: on for ddpm, off for baseline)")
    opt.add_argument("--ema_decay", type=float, default=d.ema_decay, help="EMA decay")
    opt.add_argument("--patience", type=int, default=d.patience,
                     help="early stop after this many validations without a better val MAE (0: never)")
    opt.add_argument("--skip_nonfinite", action=argparse.BooleanOptionalAction, default=d.skip_nonfinite,
                     help="skip steps with a NaN/Inf loss or gradient instead of stopping the run")

    val = p.add_argument_group("validation")
    val.add_argument("--val_overlap", type=int, default=None, help="sliding-window overlap (default patch_size/4)")
    val.add_argument("--ddim_steps", type=int, default=d.ddim_steps, help="DDIM steps of the ddpm validation sample")
    val.add_argument("--gamma_subsample", type=int, default=d.gamma_subsample,
                     help="gamma is computed on every N-th voxel per axis")
    val.add_argument("--max_val_cases", type=_none_or_count, default=None,
                     help="validate on at most this many cases (0 or 'all': every validation case)")
    val.add_argument("--val_every", type=int, default=d.val_every,
                     help="validate every N epochs (the last epoch always validates)")

    run = p.add_argument_group("run")
    run.add_argument("--log_dir", default=d.log_dir, help="parent folder of the run folder")
    run.add_argument("--exp_name", default=d.exp_name, help="run folder name inside log_dir")
    run.add_argument("--seed", type=int, default=d.seed, help="seed of the split, initialisation and sampling")
    run.add_argument("--resume", default=None, help="checkpoint to continue from (e.g. .../checkpoints/last.ckpt)")
    run.add_argument("--max_minutes", type=float, default=None,
                     help="time budget: stop (validated, checkpointed) before an epoch that would end past it; "
                          "the LR schedule still follows --epochs")
    run.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    run.add_argument("--devices", type=int, default=d.devices, help="processes (GPUs) per machine")
    run.add_argument("--num_nodes", type=int, default=d.num_nodes, help="machines (multi-node: prints the torchrun line)")
    run.add_argument("--strategy", choices=STRATEGIES, default=d.strategy,
                     help="ddp: several --devices always train with DDP (flag kept for the guide's commands)")
    run.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=d.deterministic,
                     help="deterministic kernels (slower on GPUs; needed there for a bit-identical resume)")
    run.add_argument("--gpu_cooling", action="store_true",
                     help="pause cooling_pause s every cooling_interval batches and epoch_pause s between epochs")
    run.add_argument("--cooling_interval", type=int, default=d.cooling_interval, help="batches between cooling pauses")
    run.add_argument("--cooling_pause", type=float, default=d.cooling_pause, help="cooling pause (s)")
    run.add_argument("--epoch_pause", type=float, default=d.epoch_pause, help="pause between epochs with --gpu_cooling (s)")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="tqdm progress bars (default: only when output is a terminal)")
    return p


def _none_or_name(text: str) -> Optional[str]:
    return None if text.strip().lower() in ("", "none") else text


def _none_or_count(text: str) -> Optional[int]:
    if text.strip().lower() in ("all", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of cases or 'all', got {text!r}") from None


# Settings of the machine and of this invocation. With --resume they come from the command line
# (given or default); every other setting that is not given comes from the checkpoint.
INVOCATION_SETTINGS = frozenset({
    "data_dir", "resume", "num_workers", "cache_cases", "use_store", "max_minutes", "device", "devices",
    "num_nodes", "strategy", "gpu_cooling", "cooling_interval", "cooling_pause", "epoch_pause", "progress"})


def given_settings(argv: Sequence[str]) -> Set[str]:
    """Names (argparse dests) of the flags given in ``argv``."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    given, _ = probe.parse_known_args(list(argv))
    return set(vars(given))


def adopt_checkpoint_settings(args: argparse.Namespace, given: Set[str]) -> List[str]:
    """On --resume: the checkpoint's value of every setting not given (and not a machine setting);
    returns the names of the settings that changed. CheckpointError for an unreadable checkpoint."""
    # mapped, not read: only the plain config is needed here (the Trainer reads the whole checkpoint)
    saved = load_checkpoint(args.resume, map_location="cpu", mmap=True).get("config") or {}
    adopted = []
    for name, value in saved.items():
        if hasattr(args, name) and name not in given and name not in INVOCATION_SETTINGS \
                and getattr(args, name) != value:
            setattr(args, name, value)
            adopted.append(name)
    return adopted


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = vars(args).copy()
    if values.get("val_ids"):
        values["val_ids"] = [part for item in values["val_ids"] for part in item.split(",") if part]
    return TrainConfig.from_dict(values)


def _error(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    adopted = []
    if args.resume:
        try:
            adopted = adopt_checkpoint_settings(args, given_settings(argv))
        except CheckpointError as e:
            return _error(str(e))
    try:
        config = config_from_args(args).validate()
        refuse_earlier_run(Path(config.log_dir) / config.exp_name, resuming=bool(config.resume))  # flags' wording
    except ValueError as e:
        return _error(str(e))

    wants_ddp = config.devices > 1 or config.num_nodes > 1
    if wants_ddp and not dist_utils.under_torchrun():
        if config.num_nodes == 1:  # this machine runs them: check now, not in every process
            try:
                check_processes_fit(config.device, config.devices)
            except ValueError as e:
                return _error(str(e))
        line = dist_utils.torchrun_command_line(argv, config.devices, config.num_nodes)
        if config.num_nodes > 1:
            print(f"{PROG}: run this on each of the {config.num_nodes} machines (node_rank 0..{config.num_nodes - 1}, "
                  f"rdzv_endpoint = host:port of node 0):\n  {line}")
            return 0
        print(f"{PROG}: starting {config.devices} processes with:\n  {line}", flush=True)
        return dist_utils.launch_torchrun(argv, config.devices)

    if adopted and dist_utils.context_from_env().is_main:
        print(f"{PROG}: resuming with the checkpoint's " + ", ".join(f"{n}={getattr(args, n)!r}" for n in adopted)
              + "; flags given on the command line win, except the model's (model, base_channels, levels, "
              "timesteps, schedule, rx_dose_gy: always the checkpoint's)", flush=True)
    from ..training.loop import NonFiniteLossError, Trainer
    try:
        summary = Trainer(config).fit()
    except NonFiniteLossError as e:
        return _error(str(e), code=1)
    except (CaseFormatError, CheckpointError, FileNotFoundError, ValueError) as e:
        return _error(str(e))
    except KeyboardInterrupt:
        return _error("interrupted; resume with --resume <log_dir>/<exp_name>/checkpoints/last.ckpt", code=130)
    best = summary.get("best_val_mae_gy")
    if dist_utils.context_from_env().is_main:
        print(f"{PROG}: done after {summary['epochs_completed']} epochs"
              + (f"; best val MAE {best:.3f} Gy at epoch {summary['best_epoch']}" if best is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
