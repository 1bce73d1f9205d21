"""Does a merged model from this project run in llama.cpp exactly? Convert it with llama.cpp's own converter,
tokenize real Chinese text with llama.cpp and compare the ids with SentencePiece's, then generate greedily in
llama.cpp and in transformers and compare the tokens.

    python3 bench/llamacpp/check.py --model runs/demo/export/merged             # the demo's merged model
    CLLAMA_FIXTURES=../shared/fixtures python3 bench/llamacpp/check.py --paper  # the paper's 49,953-piece merge

Everything llama.cpp-side comes from PyPI and is built on the CPU outside the checkout by build.sh (run
here when PREFIX holds no build yet; this script then re-runs itself in PREFIX/venv): llama-cpp-python's
source distribution, which vendors llama.cpp, its converter convert_hf_to_gguf.py and gguf-py.

--paper merges the real fixtures the paper's way (LLaMA's tokenizer + the paper's Chinese model, 49,953
pieces) and puts the merged tokenizer beside a tiny random-weight LLaMA (2 layers, hidden 64): the weights do
not matter to tokenization, and the converter takes the tokenizer from the model folder as it would from a 7B
one. Token ids are compared over every document of --texts (default: the fixture corpus zh_open_mix.jsonl
when CLLAMA_FIXTURES is set, else the project's shipped Chinese corpus).

Results: a JSON summary on stdout and in WORK/llamacpp_check.json; exit 0 when, as converted, every document's
ids and the greedy generation agree, 1 otherwise. When the ids differ and the GGUF's add_space_prefix is not the
SentencePiece model's add_dummy_prefix (the converter takes it from tokenizer_config.json's add_prefix_space
when that key is there), the ids are compared again on a copy with that one key set to the model's value.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PROMPTS = ["中国的首都是", "人工智能是计算机科学、心理学、哲学等学科融合的交叉学科。"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="a merged Hugging Face model folder (cllama export merged)")
    p.add_argument("--paper", action="store_true",
                   help="check the paper's merged tokenizer (needs CLLAMA_FIXTURES) on a tiny random model")
    p.add_argument("--texts", nargs="*", default=None, help=".jsonl (field text) or .txt (a line a document)")
    p.add_argument("--max-docs", type=int, default=0, help="compare only the first N documents (0: all)")
    p.add_argument("--prefix", default=os.environ.get("LLAMACPP_PREFIX", "/tmp/llamacpp"),
                   help="where build.sh puts the source, the library and the venv (default /tmp/llamacpp)")
    p.add_argument("--work", default="", help="folder for the GGUF files and results (default PREFIX/work)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to generate per prompt")
    args = p.parse_args()
    if not args.model and not args.paper:
        p.error("give --model DIR (a merged model) or --paper (or both)")
    return args


def in_venv(args: argparse.Namespace) -> None:
    """Build llama.cpp when needed and continue in the venv that holds its bindings."""
    prefix = Path(args.prefix)
    venv_python = prefix / "venv" / "bin" / "python"
    lib = prefix / "build" / "bin"
    if Path(sys.prefix).resolve() == (prefix / "venv").resolve() and os.environ.get("LLAMA_CPP_LIB_PATH"):
        return
    if not (lib / "libllama.so").exists() or not venv_python.exists():
        print(f"building llama.cpp into {prefix} (bench/llamacpp/build.sh; on 2 cores about half an hour)",
              file=sys.stderr, flush=True)
        subprocess.run(["bash", str(HERE / "build.sh"), str(prefix)], check=True)
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(lib))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    os.execve(str(venv_python), [str(venv_python), str(Path(__file__).resolve()), *sys.argv[1:]], env)


def read_texts(paths: list[str]) -> list[str]:
    out = []
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            out.append(json.loads(line)["text"] if path.endswith(".jsonl") else line)
    return out


def paper_model(work: Path) -> Path:
    """The paper's merge of the real fixtures beside a tiny random LLaMA of its vocabulary."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cllama_dist.tokenizer.config import MergeConfig
    from cllama_dist.tokenizer.merge import merge

    fixtures = Path(os.environ.get("CLLAMA_FIXTURES", ""))
    if not (fixtures / "llama_tokenizer.model").is_file():
        sys.exit("--paper needs CLLAMA_FIXTURES: the folder holding llama_tokenizer.model and chinese_sp.model")
    out, tok = work / "paper-model", work / "paper-tokenizer"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(tok, ignore_errors=True)
    merge(MergeConfig(base=str(fixtures / "llama_tokenizer.model"), add=str(fixtures / "chinese_sp.model"),
                      out=str(tok)))
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok / "tokenizer.model")).get_piece_size()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=512, tie_word_embeddings=False))
    model.save_pretrained(out)
    for f in tok.iterdir():
        if f.is_file() and f.name != "merge_report.json" and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)
    return out


def convert(model: Path, gguf: Path, llama_src: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(llama_src / "convert_hf_to_gguf.py"), str(model), "--outfile", str(gguf),
                    "--outtype", "f32"], check=True)
    return time.perf_counter() - t0


def space_prefix(gguf: Path, value: bool | None = None) -> bool:
    """The GGUF's tokenizer.ggml.add_space_prefix (llama.cpp's SentencePiece dummy prefix); set it when given."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf), "r" if value is None else "r+")
    field = reader.get_field("tokenizer.ggml.add_space_prefix")
    if field is None:
        return True  # llama.cpp's default for SentencePiece vocabularies
    if value is not None:
        field.parts[field.data[0]][0] = value
        reader.data.flush()
    return bool(field.parts[field.data[0]][0])


def compare_ids(sp, llm, texts: list[str]) -> dict:
    """llama.cpp's ids (BOS added, text not parsed for special tokens) against SentencePiece's + BOS."""
    t0 = time.perf_counter()
    differ, first, tokens = 0, None, 0
    for i, text in enumerate(texts):
        ours = [sp.bos_id(), *sp.encode(text)]
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        tokens += len(ours)
        if ours != theirs:
            differ += 1
            if first is None:
                k = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                first = {"document": i, "position": k, "sentencepiece": ours[max(0, k - 3):k + 5],
                         "llama.cpp": theirs[max(0, k - 3):k + 5]}
    return {"documents": len(texts), "sentencepiece_tokens": tokens, "documents_with_different_ids": differ,
            "first_difference": first, "seconds": round(time.perf_counter() - t0, 1)}


def check_model(name: str, model: Path, texts: list[str], work: Path, llama_src: Path, new_tokens: int) -> dict:
    import shutil

    import sentencepiece as spm
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    gguf = work / f"{name}.f32.gguf"
    seconds = convert(model, gguf, llama_src)
    sp = spm.SentencePieceProcessor(model_file=str(model / "tokenizer.model"))
    out = {"model": str(model), "gguf": str(gguf), "gguf_bytes": gguf.stat().st_size,
           "convert_seconds": round(seconds, 1), "vocab": sp.get_piece_size(),
           "gguf_add_space_prefix": space_prefix(gguf)}
    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=2, seed=0, verbose=False)
    out["ids_as_converted"] = compare_ids(sp, llm, texts)
    dummy = sp.encode("a", out_type=str)[0].startswith("\u2581")  # SentencePiece's own add_dummy_prefix
    if out["ids_as_converted"]["documents_with_different_ids"] and out["gguf_add_space_prefix"] != dummy:
        # The converter takes add_space_prefix from tokenizer_config.json's add_prefix_space when that key is
        # there, over the SentencePiece model's add_dummy_prefix; check the ids with the model's own setting.
        fixed = work / f"{name}.f32.space-prefix-fixed.gguf"
        shutil.copy(gguf, fixed)
        space_prefix(fixed, dummy)
        del llm
        llm = Llama(model_path=str(fixed), n_ctx=512, n_threads=2, seed=0, verbose=False)
        out["ids_with_add_space_prefix_set_to_the_models"] = {"gguf": str(fixed), "value": dummy,
                                                              **compare_ids(sp, llm, texts)}
    ids_ok = min(v["documents_with_different_ids"] for k, v in out.items() if k.startswith("ids_")) == 0

    # Greedy generation in both, from SentencePiece's ids of each prompt; decoded by llama.cpp and by SentencePiece.
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    gens = []
    for prompt in PROMPTS:
        ids = [sp.bos_id(), *sp.encode(prompt)]
        llm.reset()
        ll = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
            if tok == llm.token_eos() or len(ll) >= new_tokens:
                break
            ll.append(tok)
        with torch.no_grad():
            y = hf.generate(torch.tensor([ids]), max_new_tokens=len(ll) or 1, do_sample=False,
                            pad_token_id=sp.eos_id())[0, len(ids):].tolist()
        y = [t for t in y if t != sp.eos_id()][:len(ll)]
        gens.append({"prompt": prompt, "llama.cpp_ids": ll, "transformers_ids": y, "equal": ll == y,
                     "llama.cpp_text": llm.detokenize(ll).decode("utf-8", errors="replace"),
                     "sentencepiece_text": sp.decode(ll)})
    out["generations"] = gens
    out["ok_as_converted"] = out["ids_as_converted"]["documents_with_different_ids"] == 0 and all(
        g["equal"] for g in gens)
    out["ok"] = ids_ok and all(g["equal"] for g in gens)
    return out


def versions(llama_src: Path) -> dict:
    from importlib.metadata import version

    import llama_cpp

    out = {"llama_cpp_python": llama_cpp.__version__, "gguf": version("gguf"), "python": platform.python_version(),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"}
    for pkg in ("torch", "transformers", "sentencepiece"):
        out[pkg] = version(pkg)
    out["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], check=False, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    out["cllama_dist_commit"] = commit
    out["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return out


def main() -> int:
    args = parse()
    in_venv(args)
    from cllama_dist.quiet import name_accelerator, quiet_third_party

    quiet_third_party()  # stdout is the JSON summary: no library chatter on it
    name_accelerator(cuda=False)
    prefix = Path(args.prefix)
    llama_src = next(prefix.glob("llama_cpp_python-*/vendor/llama.cpp"))
    work = Path(args.work or prefix / "work")
    work.mkdir(parents=True, exist_ok=True)
    if args.texts is None:
        fixtures = Path(os.environ.get("CLLAMA_FIXTURES", ""), "zh_open_mix.jsonl")
        from cllama_dist.assets import corpus_path

        args.texts = [str(fixtures)] if fixtures.is_file() else [str(corpus_path())]
    texts = read_texts(args.texts)
    if args.max_docs:
        texts = texts[:args.max_docs]
    result = {"versions": versions(llama_src), "texts": args.texts, "checks": {}}
    if args.paper:
        result["checks"]["paper"] = check_model("paper", paper_model(work), texts, work, llama_src, args.new_tokens)
    if args.model:
        model = Path(args.model).resolve()
        result["checks"][model.name] = check_model(model.name, model, texts, work, llama_src, args.new_tokens)
    (work / "llamacpp_check.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0 if all(c["ok_as_converted"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
