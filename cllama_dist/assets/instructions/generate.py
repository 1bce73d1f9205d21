"""Writes the mechanical tasks of the demo's instruction set, deterministically.

    python3 cllama_dist/assets/instructions/generate.py          # rewrites the three mechanical_*.jsonl
    python3 cllama_dist/assets/instructions/generate.py --check  # exits 1 if a file differs from its output

Mechanical tasks have one right answer that a rule computes (copy, reverse, sort, upper/lower case,
repeat, first character, maximum, count, add), so a tiny model's progress can be measured exactly on
held-out items. The held-out file uses arguments that the training files never use for the same task.

Everything here (word lists, phrases, phrasings) was written for the cllama-dist project;
Apache-2.0, like the rest of the project. Standard library only; the output depends on nothing but
this file (a fixed seed, sorted iteration, no hashing of strings).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20240601

# Two- to four-character words, written for this file.
WORDS = (
    "苹果 香蕉 葡萄 西瓜 草莓 橘子 桃子 梨子 米饭 面条 饺子 包子 豆腐 白菜 土豆 番茄 黄瓜 茄子 鸡蛋 牛奶 "
    "面包 蛋糕 月亮 太阳 星星 白云 大海 高山 河流 森林 花园 草地 春天 夏天 秋天 冬天 早晨 中午 晚上 周末 "
    "老师 学生 医生 司机 厨师 农民 画家 歌手 朋友 邻居 爷爷 奶奶 妈妈 爸爸 哥哥 姐姐 弟弟 妹妹 小猫 小狗 "
    "兔子 熊猫 老虎 狮子 大象 猴子 长颈鹿 孔雀 燕子 金鱼 书包 铅笔 橡皮 课本 黑板 电脑 手机 雨伞 钥匙 "
    "杯子 椅子 桌子 窗户 台灯 电视 冰箱 火车 飞机 轮船 汽车 自行车 地铁 公园 学校 医院 超市 图书馆 "
    "博物馆 电影院 足球 篮球 乒乓球 游泳 跑步 唱歌 跳舞 画画 读书 写字 快乐 安静 勇敢 认真 温暖 明亮 "
    "干净 美丽 聪明 热闹"
).split()

# Short sentences for the copy task, written for this file.
PHRASES = (
    "今天天气很好。", "我喜欢喝绿茶。", "小猫在窗台上睡觉。", "明天我们去公园。", "他每天早上跑步。",
    "这本书很有意思。", "妈妈在厨房做饭。", "外面正在下雨。", "请把门关上。", "我们一起吃午饭吧。",
    "火车八点出发。", "花园里开满了花。", "弟弟在写作业。", "这杯咖啡有点苦。", "图书馆很安静。",
    "周末我去看电影。", "天空中飞过一群鸟。", "老师表扬了她。", "桌子上有一个苹果。", "他把钥匙忘在家里了。",
    "夏天的西瓜很甜。", "我们明天早上见。", "风把树叶吹落了。", "河边有一座小桥。", "姐姐喜欢画画。",
    "超市九点开门。", "这条路通向学校。", "爷爷在院子里种菜。", "晚饭后我们去散步。", "月亮又圆又亮。",
    "小狗跑得很快。", "冬天要多穿衣服。", "请慢慢说。", "雨后出现了彩虹。", "他会说三种语言。",
    "我的手机没电了。", "窗外有一棵大树。", "她正在听音乐。", "我们班有四十个学生。", "春天来了，天气变暖了。",
    "汽车停在门口。", "这道题不难。", "灯还亮着。", "奶奶给我讲故事。", "水开了。",
    "我想喝一杯水。", "他们在踢足球。", "书包里有三本书。", "早睡早起身体好。", "海边的风很大。",
)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PER_TASK_TRAIN = 150
TASKS = ("copy", "reverse", "sort", "upper", "lower", "repeat3", "first_char", "max", "count", "add")

# Phrasings: mostly one per task (a tiny model learns a fixed phrasing fastest), a second for some.
PHRASING = {
    "copy": ["复制这句话：{x}", "原样重复下面这句话。\n{x}"],
    "reverse": ["把这个词语倒过来写：{x}"],
    "sort": ["把这些数字从小到大排序：{x}", "把下面的数字从小到大排序。\n{x}"],
    "upper": ["把这个字母串转换成大写：{x}"],
    "lower": ["把这个字母串转换成小写：{x}"],
    "repeat3": ["把这个词重复三遍：{x}"],
    "first_char": ["这个词语的第一个字是什么？{x}"],
    "max": ["找出最大的数：{x}"],
    "count": ["这个字母串有几个字母？{x}"],
    "add": ["计算：{x}"],
}


def answer(task: str, x: str) -> str:
    """The one right output of a task for its argument."""
    if task == "copy":
        return x
    if task == "reverse":
        return x[::-1]
    if task == "sort":
        return " ".join(str(n) for n in sorted(int(t) for t in x.split()))
    if task == "upper":
        return x.upper()
    if task == "lower":
        return x.lower()
    if task == "repeat3":
        return "、".join([x] * 3)
    if task == "first_char":
        return x[0]
    if task == "max":
        return str(max(int(t) for t in x.split()))
    if task == "count":
        return str(len(x))
    if task == "add":
        a, b = x.split("+")
        return str(int(a) + int(b))
    raise ValueError(task)


def arguments(task: str, rng: random.Random, n: int = 400) -> list[str]:
    """Distinct arguments of a task, in a fixed (seeded) order: many, so that a model has to learn the
    rule rather than memorise the pairs."""
    def distinct(make) -> list[str]:
        seen: dict[str, None] = {}
        while len(seen) < n:
            seen.setdefault(make(), None)
        return list(seen)

    if task == "copy":
        xs = list(PHRASES) + distinct(lambda: "".join(rng.sample(WORDS, rng.randint(2, 3))) + "。")[: n - len(PHRASES)]
    elif task in ("reverse", "repeat3", "first_char"):
        xs = list(WORDS) + distinct(lambda: "".join(rng.sample(WORDS, 2)))[: n - len(WORDS)]
    elif task in ("upper", "count"):
        xs = distinct(lambda: "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))))
    elif task == "lower":
        xs = distinct(lambda: "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6))).upper())
    elif task in ("sort", "max"):
        xs = distinct(lambda: " ".join(str(rng.randint(0, 20)) for _ in range(rng.randint(3, 5))))
    elif task == "add":
        xs = [f"{a}+{b}" for a in range(10) for b in range(10)]
    else:
        raise ValueError(task)
    xs = list(dict.fromkeys(xs))  # a combination may equal a listed word: keep the first
    rng.shuffle(xs)
    return xs


def build() -> dict[str, list[dict]]:
    rng = random.Random(SEED)
    train, heldout, chat = [], [], []
    per_task_train, per_task_heldout = PER_TASK_TRAIN, 6
    pools: dict[str, list[str]] = {}
    for task in TASKS:
        xs = arguments(task, rng)
        held, rest = xs[:per_task_heldout], xs[per_task_heldout:]
        pools[task] = rest
        for i, x in enumerate(rest[:per_task_train]):
            phr = PHRASING[task][i % len(PHRASING[task])]
            train.append(_alpaca(task, phr, x))
        for x in held:
            heldout.append(_alpaca(task, PHRASING[task][0], x))
    # Multi-turn: the second request works on the first answer, so the history matters.
    follow = [("reverse", "repeat3", "再把它重复三遍。"), ("upper", "lower", "再把结果转换成小写。"),
              ("sort", "max", "其中最大的数是几？"), ("copy", "first_char", "这句话的第一个字是什么？")]
    for k in range(60):
        t1, t2, ask = follow[k % len(follow)]
        x = pools[t1][(k * 7) % len(pools[t1])]
        a1 = answer(t1, x)
        a2 = answer(t2, a1 if t2 != "first_char" else x)
        msgs = []
        if k % 5 == 0:
            msgs.append({"role": "system", "content": "你是一个认真的助手，只给出答案。"})
        msgs += [{"role": "user", "content": PHRASING[t1][0].format(x=x)}, {"role": "assistant", "content": a1},
                 {"role": "user", "content": ask}, {"role": "assistant", "content": a2}]
        chat.append({"messages": msgs, "task": f"{t1}+{t2}"})
    return {"mechanical_train.jsonl": train, "mechanical_heldout.jsonl": heldout, "mechanical_chat.jsonl": chat}


def _alpaca(task: str, phrasing: str, x: str) -> dict:
    if "\n" in phrasing:  # the argument goes into "input": instruction + "\n" + input, as the paper joins them
        instruction, _ = phrasing.split("\n", 1)
        return {"instruction": instruction, "input": x, "output": answer(task, x), "task": task}
    return {"instruction": phrasing.format(x=x), "input": "", "output": answer(task, x), "task": task}


def dumps(records: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    ap.add_argument("--out", default=str(HERE), help="folder to write to (default: this one)")
    args = ap.parse_args(argv)
    differ = []
    for name, records in build().items():
        path = Path(args.out) / name
        text = dumps(records)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                differ.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if differ:
        print("differs from generate.py's output: " + ", ".join(differ), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
