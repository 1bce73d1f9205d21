"""The `cllama` command: one subcommand per stage.

    cllama tokenizer train  --corpus corpus/ --out out/chinese_sp --vocab-size 20000
    cllama tokenizer merge  --base llama/tokenizer.model --add out/chinese_sp.model --out out/merged
    cllama tokenizer report --tokenizer llama/tokenizer.model --tokenizer out/merged --corpus heldout.jsonl
    cllama preprocess       --corpus data/ --tokenizer out/merged --output shards/ --block-size 512
    cllama preprocess finalize --output shards/
    cllama train            --config configs/llama-7b.yaml --dry-run
    torchrun --nproc_per_node 2 -m cllama_dist.train --config run.yaml   (or: deepspeed cllama_dist/train.py ...)
    cllama demo

Every subcommand takes ``--config FILE.yaml``; flags override its values. Problems with the input are
reported as one line naming the file and the problem (exit status 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .config import (MergeConfig, PreprocessConfig, ReportConfig, TokenizerTrainConfig, add_arguments, from_args,
                     load_yaml)
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
    from .data.preprocess import finalize, preprocess

    if args.action == "finalize":
        if not args.output:
            raise UserError("finalize needs --output (the shards folder)")
        m = finalize(args.output, verify=True)
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


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(out=args.out, base_tokenizer=args.base_tokenizer, force=args.force)


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
    pp.add_argument("action", nargs="?", choices=["finalize"],
                    help="finalize: check and join the tasks' output into manifest.json")
    _with_config(pp, PreprocessConfig)
    pp.set_defaults(func=cmd_preprocess)

    sub.add_parser("train", add_help=False,
                   help="train LoRA + new embedding rows (one process; start it with deepspeed/torchrun/srun); "
                        "`cllama train --help` lists its flags")
    d = sub.add_parser("demo", help="run the whole pipeline on the shipped corpus (CPU, tiny model)")
    d.add_argument("--out", default="runs/demo", help="folder for every artefact (default: runs/demo)")
    d.add_argument("--base-tokenizer", default=None,
                   help="a real base SentencePiece model (e.g. LLaMA's tokenizer.model); default: build one")
    d.add_argument("--force", action="store_true", help="redo every stage instead of reusing finished ones")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        # One process of a training job (launched by deepspeed / torchrun / srun, or alone on one device);
        # its flags are TrainConfig's, parsed by the trainer's own entry point.
        from .train import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
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
