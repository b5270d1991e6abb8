"""``nerco vectors``: word2vec character, bigram and word vectors from raw text, read back by the configs'
reader; word2vec files with and without their header line; the lexicon union."""

import random

import numpy as np
import pytest

from nerco_dist.cli import main
from nerco_dist.data.dataset import char_bigrams
from nerco_dist.data.lexicon import Lexicon, read_word2vec
from nerco_dist.data.vectors import segment
from nerco_dist.data.vocab import PretrainedVectors, Vocabulary, embedding_matrices

PAIR = "甲乙"  # interchangeable: each stands, at random, in the same planted context 山_水


def planted_text(path, lines=600, seed=0):
    """Random characters from a small alphabet, with 山甲水 or 山乙水 planted in every line."""
    rng = random.Random(seed)
    alphabet = list("天地人你我他火木金土日月星云风雨")
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(lines):
            chars = [rng.choice(alphabet) for _ in range(12)]
            at = rng.randrange(len(chars))
            f.write("".join(chars[:at]) + "山" + rng.choice(PAIR) + "水" + "".join(chars[at:]) + "\n")
    return path


def cosine(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_vectors_are_written_read_back_and_put_the_planted_pair_together(tmp_path):
    raw = planted_text(tmp_path / "raw.txt")
    lexicon = tmp_path / "words.txt"
    lexicon.write_text("山甲水\n天地\n", encoding="utf-8")
    out = tmp_path / "vec"
    assert main(["vectors", str(out), "--raw", str(raw), "--lexicon", str(lexicon), "--dim", "16", "--epochs", "20",
                 "--window", "1"]) == 0
    index, vectors = read_word2vec(out / "char.vec")
    others = [c for c in index if c not in PAIR + "山水"]  # the random characters: chance
    together = cosine(vectors[index["甲"]], vectors[index["乙"]])
    assert together > max(cosine(vectors[index["甲"]], vectors[index[c]]) for c in others)
    bigrams, _ = read_word2vec(out / "bigram.vec")
    lines = raw.read_text(encoding="utf-8").split()
    assert set(bigrams) == {b for line in lines for b in char_bigrams(list(line))} and "山甲" in bigrams
    words, _ = read_word2vec(out / "word.vec")
    assert "山甲水" in words and "乙" in words and "甲" not in words  # 山甲水 is a word of the lexicon, 山乙水 not
    # what a config's data.char_vectors reads: the file's rows for the vocabulary's tokens
    vocab = Vocabulary(["甲", "乙", "未"])
    matrix, _ = embedding_matrices(vocab, 16, PretrainedVectors.read(str(out / "char.vec"), 16), np.random.default_rng(0))
    assert np.array_equal(matrix[vocab["甲"]], vectors[index["甲"]]) and not matrix[0].any()


def test_forward_maximum_matching():
    lexicon = Lexicon(["南京", "南京市", "市长", "长江", "长江大桥", "大桥"])
    assert segment(list("南京市长江大桥"), lexicon) == ["南京市", "长江大桥"]
    assert segment(list("我在南京"), lexicon) == ["我", "在", "南京"]


def test_headered_and_headerless_word2vec_files_read_the_same(tmp_path):
    rows = "南京 0.1 0.2 0.3\n长江 -1 0.5 2\n"
    headered, headerless = tmp_path / "a.vec", tmp_path / "b.vec"
    headered.write_text("2 3\n" + rows, encoding="utf-8")
    headerless.write_text(rows, encoding="utf-8")
    (index_a, a), (index_b, b) = read_word2vec(headered), read_word2vec(headerless)
    assert index_a == index_b == {"南京": 0, "长江": 1}
    assert np.array_equal(a, b) and a.dtype == np.float32
    assert np.allclose(b, [[0.1, 0.2, 0.3], [-1, 0.5, 2]])


def test_a_union_of_lexicons_has_the_words_of_each(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("南京\n长江\n", encoding="utf-8")
    b.write_text("长江\n大桥\n", encoding="utf-8")
    union = Lexicon.load(f"{a}+{b}")
    assert union.words == {"南京", "长江", "大桥"} and union.source == f"{a}+{b}"
    with_jieba = Lexicon.load(f"jieba+{a}")
    assert {"南京", "长江"} <= with_jieba.words and len(with_jieba) > len(Lexicon.load("jieba")) - 1


@pytest.mark.parametrize("args, message", [
    (["--dim", "0"], "--dim=0"),
    (["--raw", "missing.txt"], "raw text file not found"),
])
def test_bad_options_and_inputs_are_refused(tmp_path, capsys, args, message):
    assert main(["vectors", str(tmp_path / "out"), "--data-root", str(tmp_path), *args]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_undecodable_line_is_named(tmp_path, capsys):
    raw = tmp_path / "raw.txt"
    raw.write_bytes("好的\n".encode() + b"\xff\xfe\n")
    assert main(["vectors", str(tmp_path / "out"), "--raw", str(raw)]) == 2
    assert f"{raw}:2: not valid UTF-8" in capsys.readouterr().err


def test_the_text_is_streamed_memory_stays_flat_in_its_length(tmp_path):
    """Python's peak allocation while vectors are trained on the same vocabulary in 1x and 4x as many lines:
    token lists held in memory would grow with the text; a stream holds a few batches of lines at a time."""
    import tracemalloc

    from nerco_dist.data.vectors import build_vectors

    peaks = []
    for lines in (5_000, 20_000):
        raw = planted_text(tmp_path / f"raw{lines}.txt", lines=lines)
        tracemalloc.start()
        build_vectors([raw], [], None, tmp_path / f"vec{lines}", dim=8, epochs=1, workers=1, kinds=["bigram"])
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # reference: what the extra lines' bigram token lists alone take when held, measured the same way
    lines = (tmp_path / "raw20000.txt").read_text(encoding="utf-8").split()[5_000:]
    tracemalloc.start()
    held = [char_bigrams(list(line)) for line in lines]
    extra = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(held) == 15_000 and peaks[1] - peaks[0] < 0.1 * extra, (peaks, extra)


def test_spaces_of_a_training_split_are_no_token_and_the_files_read_back(tmp_path):
    """A CLUENER sentence keeps its spaces as characters; the vectors, like raw lines, drop them, so every file
    written reads back with the token and the dimension it was written with."""
    corpus = tmp_path / "c.json"
    corpus.write_text("\n".join('{"text": "山甲水 在 天地", "label": {}}' for _ in range(5)) + "\n", encoding="utf-8")
    out = tmp_path / "vec"
    assert main(["vectors", str(out), "--corpus", str(corpus), "--kinds", "char", "bigram", "--min-count", "1",
                 "--epochs", "1", "--dim", "4", "--workers", "1"]) == 0
    chars, vectors = read_word2vec(out / "char.vec")
    assert set(chars) == set("山甲水在天地") and vectors.shape == (6, 4)
    bigrams, _ = read_word2vec(out / "bigram.vec")
    assert set(bigrams) == set(char_bigrams(list("山甲水在天地")))


def test_a_byte_order_mark_is_not_part_of_a_word_nor_of_the_header(tmp_path):
    lexicon = tmp_path / "words.txt"
    lexicon.write_text("\ufeff北京大学\n清华大学\n", encoding="utf-8")
    assert [(m.head, m.tail) for m in Lexicon.load(str(lexicon)).match(list("我在北京大学和清华大学"))] == [(2, 5), (7, 10)]
    vec = tmp_path / "v.vec"
    vec.write_text("\ufeff2 3\n甲 1 2 3\n乙 4 5 6\n", encoding="utf-8")
    index, vectors = read_word2vec(vec)
    assert index == {"甲": 0, "乙": 1} and vectors.tolist() == [[1, 2, 3], [4, 5, 6]]
