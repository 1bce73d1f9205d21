"""The `cllama` command: one subcommand per stage.

    cllama tokenizer train  --corpus corpus/ --out out/chinese_sp --vocab-size 20000
    cllama tokenizer merge  --base llama/tokenizer.model --add out/chinese_sp.model --out out/merged
    cllama tokenizer report --tokenizer llama/tokenizer.model --tokenizer out/merged --corpus heldout.jsonl
    cllama preprocess       --corpus data/ --tokenizer out/merged --output shards/ --block-size 512
    cllama preprocess finalize --output shards/
    cllama train            --config configs/llama-7b.yaml --dry-run
    torchrun --nproc_per_node 2 -m cllama_dist.train --config run.yaml   (or: deepspeed cllama_dist/train.py ...)
    cllama export adapter   --run runs/7b --out out/adapter
    cllama export merged    --base llama-7b/ --adapter out/adapter --out out/merged-7b
    cllama eval             --model llama-7b/ --adapter out/adapter --inputs heldout.jsonl --generate
    cllama demo

Every subcommand takes ``--config FILE.yaml``; flags override its values. Problems with the input are
reported as one line naming the file and the problem (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import (EvalConfig, MergeConfig, PreprocessConfig, ReportConfig, TokenizerTrainConfig, add_arguments, from_args,
                     load_yaml)
from .demo import DEMO_STEPS, STAGES
from .errors import UserError


def _with_config(parser: argparse.ArgumentParser, cls: type) -> None:
    parser.add_argument("--config", help="YAML file with this stage's settings; flags override it")
    add_arguments(parser, cls)
    parser.set_defaults(_cls=cls)


def _cfg(args: argparse.Namespace):
    base = load_yaml(args.config) if getattr(args, "config", None) else {}
    return from_args(args._cls, args, base)


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .tokenizer.train import train

    r = train(_cfg(args))
    print(f"wrote {r['model']} ({r['config']['vocab_size']:,} pieces) from {r['sentences_sampled']:,} sampled "
          f"of {r['sentences_seen']:,} sentences in {r['documents_seen']:,} documents; report: "
          f"{r['model'][:-len('.model')]}.report.json")


def cmd_tokenizer_merge(args: argparse.Namespace) -> None:
    from .tokenizer.merge import merge

    cfg = _cfg(args)
    r = merge(cfg)
    print(f"merged {r['orig_vocab_size']:,} + {r['added']:,} new pieces = {r['new_vocab_size']:,} "
          f"({r['overlap']:,} already present) -> {cfg.out}")
    for note in r["notes"]:
        print(f"note: {note}")


def cmd_tokenizer_report(args: argparse.Namespace) -> None:
    from .tokenizer.report import format_table, report

    cfg = _cfg(args)
    print(format_table(report(cfg)))
    if cfg.json_out:
        print(f"\nJSON: {cfg.json_out}")


def cmd_preprocess(args: argparse.Namespace) -> None:
    from .data.preprocess import finalize, prepare, preprocess

    if args.action == "finalize":
        output = args.output or (load_yaml(args.config).get("output") if args.config else None)
        if not output:
            raise UserError("finalize needs --output (the shards folder)")
        args.output = output
        m = finalize(output, verify=True)
    elif args.action == "prepare":
        cfg = _cfg(args)
        plan = prepare(cfg)
        print(f"{cfg.output}: {len(plan['groups'])} shard groups over {cfg.num_tasks} task(s), "
              f"{len(plan['chunks'])} input chunks; ready for the tasks")
        return
    else:
        cfg = _cfg(args)
        m = preprocess(cfg)
        if m is None:
            print(f"task {cfg.task_id} of {cfg.num_tasks} done; after all tasks: "
                  f"cllama preprocess finalize --output {cfg.output}")
            return
    t, v = m["splits"]["train"], m["splits"]["validation"]
    print(f"{m['totals']['documents']:,} documents -> {t['sequences']:,} train + {v['sequences']:,} validation "
          f"sequences of {m['block_size']} tokens ({m['dtype']}), {len(t['shards']) + len(v['shards'])} shards; "
          f"skipped: { {k: c for k, c in m['skipped'].items() if c} or 'none'}; manifest: "
          f"{Path(args.output) / 'manifest.json'}")


def cmd_submit(args: argparse.Namespace) -> None:
    from .launch.submit import submit_preprocess, submit_train

    rest = (["--config", args.config] if args.config else []) + list(args.rest)
    if args.what == "train":
        job = submit_train(rest, nodes=args.nodes, gpus_per_node=args.gpus_per_node, partition=args.partition,
                           time=args.time, cpus_per_task=args.cpus, device=args.device,
                           procs_per_node=args.procs_per_node, folder=args.folder, local=args.local)
        print(f"submitted training job {job.job_id}; logs: {args.folder}/{job.job_id}_*_log.out")
        jobs = [job]
    else:
        array, final = submit_preprocess(rest, tasks=args.tasks, cpus=args.cpus, partition=args.partition,
                                         time=args.time, folder=args.folder, local=args.local)
        print(f"submitted {len(array)} preprocessing tasks ({array[0].job_id.split('_')[0]}) and finalize job "
              f"{final.job_id}; logs: {args.folder}/")
        jobs = [*array, final]
    if args.wait:
        for job in jobs:
            print(f"{job.job_id}: {job.results()}")


def cmd_export_adapter(args: argparse.Namespace) -> None:
    from .export import export_adapter

    m = export_adapter(args.run, args.out, args.step)
    print(f"wrote {args.out}: step {m['step']}, {m['trained_parameters']:,} trained parameters (LoRA + "
          f"{m['new_vocab'] - m['orig_vocab']:,} new rows in embed_tokens and lm_head), tokenizer beside it")


def cmd_export_merged(args: argparse.Namespace) -> None:
    from .export import export_merged

    m = export_merged(args.base, args.adapter, args.out, args.dtype)
    print(f"wrote {m['out']}: {m['shards']} shard(s), vocab_size {m['vocab_size']:,}, {m['lora_modules']} LoRA modules "
          f"merged, {m['dtype']}; tokenizer beside it")


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval import evaluate, format_result

    print(format_result(evaluate(_cfg(args))))


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out=args.out, base_tokenizer=args.base_tokenizer, force=args.force, steps=args.steps, until=args.until)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cllama", description=__doc__.split("\n")[0])
    p.add_argument("--version", action="version", version=f"cllama-dist {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    tok = sub.add_parser("tokenizer", help="the vocabulary stage").add_subparsers(dest="action", required=True)
    t = tok.add_parser("train", help="train a SentencePiece model on a corpus (streamed, sampled)")
    _with_config(t, TokenizerTrainConfig)
    t.set_defaults(func=cmd_tokenizer_train)
    m = tok.add_parser("merge", help="append a model's new pieces to a base tokenizer, keeping base ids")
    _with_config(m, MergeConfig)
    m.set_defaults(func=cmd_tokenizer_merge)
    r = tok.add_parser("report", help="compare tokenizers on a corpus")
    _with_config(r, ReportConfig)
    r.set_defaults(func=cmd_tokenizer_report)

    pp = sub.add_parser("preprocess", help="tokenize a corpus into packed Arrow shards (offline, CPU)")
    pp.add_argument("action", nargs="?", choices=["prepare", "finalize"],
                    help="prepare: check the flags and create the output folder's plan (before an array of "
                         "tasks); finalize: check and join the tasks' output into manifest.json")
    _with_config(pp, PreprocessConfig)
    pp.set_defaults(func=cmd_preprocess)

    sub.add_parser("train", add_help=False,
                   help="train LoRA + new embedding rows (one process; start it with deepspeed/torchrun/srun); "
                        "`cllama train --help` lists its flags")
    sb = sub.add_parser("submit", help="submit training or preprocessing through submitit (Slurm or local)")
    sb.add_argument("what", choices=["train", "preprocess"])
    sb.add_argument("--config", help="the stage's YAML config")
    sb.add_argument("--nodes", type=int, default=1, help="nodes (train; default 1)")
    sb.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node; one process each (default 8)")
    sb.add_argument("--procs-per-node", type=int, default=None, help="processes per node (default: GPUs, or 1 on CPU)")
    sb.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="cpu: gloo, no GPUs requested")
    sb.add_argument("--tasks", type=int, default=1, help="array tasks (preprocess)")
    sb.add_argument("--cpus", type=int, default=8, help="CPU cores per task (default 8)")
    sb.add_argument("--partition", default=None, help="Slurm partition (default: the cluster's default)")
    sb.add_argument("--time", default="24:00:00", help="time limit of one attempt (minutes, HH:MM:SS, D-HH:MM:SS)")
    sb.add_argument("--folder", default="runs/submitit", help="submitit's folder: pickles and logs")
    sb.add_argument("--local", action="store_true", help="run on this machine (submitit's local executor)")
    sb.add_argument("--wait", action="store_true", help="wait for the jobs and print their results")
    sb.epilog = "Flags after a lone -- go to the trainer / preprocessor."
    sb.set_defaults(func=cmd_submit)

    ex = sub.add_parser("export", help="export a run").add_subparsers(dest="action", required=True)
    ea = ex.add_parser("adapter", help="a PEFT adapter (LoRA + new embedding rows) with the merged tokenizer")
    ea.add_argument("--run", required=True, help="the run folder (output_dir of the training)")
    ea.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest complete one)")
    ea.add_argument("--out", required=True, help="output folder")
    ea.set_defaults(func=cmd_export_adapter)
    em = ex.add_parser("merged", help="a full Hugging Face model: base + adapter, merged shard by shard")
    em.add_argument("--base", required=True, help="the base model folder (safetensors)")
    em.add_argument("--adapter", required=True, help="a folder from `cllama export adapter`")
    em.add_argument("--out", required=True, help="output folder")
    em.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16", help="weights dtype (default bf16)")
    em.set_defaults(func=cmd_export_merged)

    ev = sub.add_parser("eval", help="loss, perplexity and bits per character of a model (base, merged, or base + "
                                     "adapter) on held-out text or shards; --generate samples continuations")
    _with_config(ev, EvalConfig)
    ev.set_defaults(func=cmd_eval)

    d = sub.add_parser("demo", help="run the whole pipeline on the shipped corpus (CPU, tiny model)")
    d.add_argument("--out", default="runs/demo", help="folder for every artefact (default: runs/demo)")
    d.add_argument("--base-tokenizer", default=None,
                   help="a real base SentencePiece model (e.g. LLaMA's tokenizer.model); default: build one")
    d.add_argument("--force", action="store_true", help="redo every stage instead of reusing finished ones")
    d.add_argument("--steps", type=int, default=DEMO_STEPS,
                   help=f"training steps of the 2-process ZeRO-3 stage (default {DEMO_STEPS})")
    d.add_argument("--until", default=None, metavar="STAGE", help=f"stop after this stage ({', '.join(STAGES)})")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        # One process of a training job (launched by deepspeed / torchrun / srun, or alone on one device);
        # its flags are TrainConfig's, parsed by the trainer's own entry point.
        from .train import main as train_main

        return train_main(argv[1:])
    rest: list[str] = []
    if argv[:1] == ["submit"] and "--" in argv:  # what follows a lone -- belongs to the job, not to submit
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.rest = rest
    try:
        args.func(args)
    except UserError as exc:
        print(f"cllama: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cllama: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
