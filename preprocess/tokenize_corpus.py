"""The offline stage's entry point (same as `cllama preprocess`), for CPU nodes and Slurm arrays.

    python preprocess/tokenize_corpus.py --corpus data/zh/ --tokenizer out/merged --output shards/ --block-size 512
    python preprocess/tokenize_corpus.py --corpus data/zh/ ... --num-tasks 16 --task-id 3
    python preprocess/tokenize_corpus.py finalize --output shards/

Every flag is documented by `--help`; a YAML file with the same keys can be given with --config.
It never imports torch: it starts in well under a second.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cllama_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
