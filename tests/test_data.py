"""Readers, tag schemes, lexicon matching, sentence splitting and batching."""

import json
import logging
import os
import random
import re
import subprocess
import sys

import pytest
import torch

from nerco_dist.data.dataset import (LabelSet, LatticeEncoder, LengthBucketBatchSampler, Vocabs, char_bigrams,
                                     collate, lexicon_matches, piece_spans)
from nerco_dist.data.lexicon import Lexicon, read_word2vec
from nerco_dist.data.readers import Sentence, read_corpus
from nerco_dist.data.splits import holdout_split, read_splits
from nerco_dist.data.tags import (Entity, detect_scheme, entities, from_entities, repair_orphan_inside, semantic_class,
                                  to_bio)
from nerco_dist.errors import InputError

# --- real corpora, published counts -------------------------------------------------------------------

PUBLISHED = [
    ("resume/train.char.bmes", 3821, "BMES"), ("resume/dev.char.bmes", 463, "BMES"),
    ("resume/test.char.bmes", 477, "BMES"),
    ("weibo/weiboNER_2nd_conll.train", 1350, "BIO"), ("weibo/weiboNER_2nd_conll.dev", 270, "BIO"),
    ("weibo/weiboNER_2nd_conll.test", 270, "BIO"),
    ("msra/train.char.bmes", 46364, "BMES"), ("msra/test.char.bmes", 4365, "BMES"),
]


@pytest.mark.parametrize("relpath,count,scheme", PUBLISHED)
def test_real_corpora_have_published_counts(data_root, relpath, count, scheme):
    corpus = read_corpus(data_root / relpath)
    assert len(corpus) == count
    assert corpus.source_scheme == scheme
    for s in corpus.sentences:
        assert len(s.chars) == len(s.tags) > 0
        assert all(t == "O" or t[:2] in ("B-", "I-") for t in s.tags)


def test_weibo_characters_and_orphan_inside_entities(data_root, caplog):
    with caplog.at_level(logging.WARNING, logger="nerco_dist"):
        train = read_corpus(data_root / "weibo/weiboNER_2nd_conll.train")
        test = read_corpus(data_root / "weibo/weiboNER_2nd_conll.test")
    assert (train.orphan_inside, test.orphan_inside) == (10, 4)  # the published quirk: 14 in all
    assert sum("begin with I-" in r.getMessage() for r in caplog.records) == 2  # once per file
    # the tags as written, read by hand: the same entities (conlleval's reading), now every one opened by B-
    written = [[line.split("\t")[1] for line in block.splitlines()] for block in
               (data_root / "weibo/weiboNER_2nd_conll.train").read_text(encoding="utf-8").strip().split("\n\n")]
    assert [entities(tags) for tags in written] == [entities(s.tags) for s in train.sentences]
    assert all(s.tags[e.start].startswith("B-") for s in train.sentences for e in entities(s.tags))
    raw = (data_root / "weibo/weiboNER_2nd_conll.train").read_text(encoding="utf-8").split("\n")[0].split("\t")[0]
    assert train.sentences[0].chars[0] == raw[:-1]  # the token minus its position digit
    assert all(c[-1] not in "0123456789" or len(c) == 1 for s in train.sentences for c in s.chars)


def test_msra_longest_test_sentence_is_kept_whole(data_root):
    test = read_corpus(data_root / "msra/test.char.bmes")
    assert max(len(s) for s in test.sentences) == 1475


# --- bad input --------------------------------------------------------------------------------------


def write(tmp_path, name, content, binary=False):
    p = tmp_path / name
    p.write_bytes(content) if binary else p.write_text(content, encoding="utf-8")
    return p


@pytest.mark.parametrize("content,line,problem", [
    ("中 B-ORG\n国 I-ORG\n\n人 O extra\n", 4, "malformed line"),
    ("中 B-ORG\n国\n", 2, "malformed line"),
    ("中 B-ORG\n国 X-ORG\n", 2, "ill-formed tag"),
    ("中 B-ORG\n国 I_ORG\n", 2, "ill-formed tag"),
    ("中 B-ORG\n国 B-\n", 2, "ill-formed tag"),
    ("中 B-ORG\n国 I-O\x00RG\n", 2, "control character"),  # not a new type 'O\x00RG'
    ("中 B-ORG\n国 I-ORG\x7f\n", 2, "control character"),
    ("中国 B-ORG\n", 1, "not a single character"),
])
def test_bad_lines_name_file_and_line(tmp_path, content, line, problem):
    p = write(tmp_path, "bad.bmes", content)
    with pytest.raises(InputError) as err:
        read_corpus(p)
    assert err.value.line == line and problem in str(err.value) and str(p) in str(err.value)


def test_empty_file(tmp_path):
    for content in ("", "\n\n  \n"):
        with pytest.raises(InputError, match="empty file"):
            read_corpus(write(tmp_path, "empty.bmes", content))


def test_not_utf8_names_line(tmp_path):
    p = write(tmp_path, "gbk.bmes", "中 O\n".encode("utf-8") + "国 O\n".encode("gbk"), binary=True)
    with pytest.raises(InputError, match="not valid UTF-8") as err:
        read_corpus(p)
    assert err.value.line == 2


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        read_corpus(tmp_path / "nope.bmes")


def test_mixed_schemes_name_the_first_tag_that_does_not_fit(tmp_path):
    p = write(tmp_path, "mix.bmes", "中 B-ORG\n国 M-ORG\n华 E-ORG\n\n人 B-PER\n民 I-PER\n日 I-PER\n\n报 I-ORG\n")
    with pytest.raises(InputError, match="mix") as err:
        read_corpus(p)
    assert err.value.line == 6 and "'I-PER' does not fit the BMES tags" in str(err.value)
    with pytest.raises(InputError) as err:
        read_corpus(write(tmp_path, "mix.bio", "中 B-ORG\n国 I-ORG\n\n人 B-PER\n民 M-PER\n"))
    assert err.value.line == 5 and "'M-PER' does not fit the BIO/BIOES tags" in str(err.value)


def test_ideographic_space_is_a_character(tmp_path):
    """U+3000 is white space to str.split() but a character of Chinese text; only spaces and tabs separate."""
    corpus = read_corpus(write(tmp_path, "space.bmes", "张 B-NAME\n三 E-NAME\n\u3000 O\n\u00a0\tO\n好 O\n"))
    assert corpus.sentences[0].chars == ["张", "三", "\u3000", "\u00a0", "好"]
    assert entities(corpus.sentences[0].tags) == [Entity(0, 2, "NAME")]
    with pytest.raises(InputError, match="malformed line") as err:
        read_corpus(write(tmp_path, "alone.bmes", "张 O\n\u3000\n"))  # a character without its tag
    assert err.value.line == 2


def test_bad_weibo_token(tmp_path):
    p = write(tmp_path, "w.conll", "科0\tO\n技\tO\n")
    with pytest.raises(InputError, match="position digits") as err:
        read_corpus(p, "weibo")
    assert err.value.line == 2


def test_cluener_reader(tmp_path):
    p = write(tmp_path, "c.json", '{"text": "浙商银行企业信贷部叶老桂", "label": {"name": {"叶老桂": [[9, 11]]}, '
                                  '"company": {"浙商银行": [[0, 3]]}}}\n')
    s = read_corpus(p).sentences[0]
    assert entities(s.tags) == [Entity(0, 4, "company"), Entity(9, 12, "name")]
    bad = write(tmp_path, "bad.json", '{"text": "abc"}\n{"text": "浙商", "label": {"x": {"浙江": [[0, 1]]}}}\n')
    with pytest.raises(InputError, match="does not match") as err:
        read_corpus(bad)
    assert err.value.line == 2


CLUENER_RECORDS = [
    {"text": "浙商银行企业信贷部叶老桂", "label": {"name": {"叶老桂": [[9, 11]]}, "company": {"浙商银行": [[0, 3]]}}},
    {"text": "生生不息CSOL生化狂潮让你填弹狂扫", "label": {"game": {"CSOL": [[4, 7]]}}},
    {"text": "今天天气很好"},  # unlabelled, as CLUENER's test split
]


@pytest.mark.parametrize("layout", ["pretty objects", "array", "compact array"])
def test_cluener_as_published_pretty_printed_or_as_an_array(tmp_path, layout):
    """Common copies of CLUENER are one JSON document, not JSON lines: the same sentences, each at the line
    where its record starts."""
    lines = write(tmp_path, "lines.json", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in CLUENER_RECORDS))
    document = {"pretty objects": "\n".join(json.dumps(r, ensure_ascii=False, indent=4) for r in CLUENER_RECORDS),
                "array": json.dumps(CLUENER_RECORDS, ensure_ascii=False, indent=2),
                "compact array": json.dumps(CLUENER_RECORDS, ensure_ascii=False)}[layout]
    pretty = read_corpus(write(tmp_path, "pretty.json", document + "\n"))
    expected = read_corpus(lines).sentences
    assert [(s.chars, s.tags) for s in pretty.sentences] == [(s.chars, s.tags) for s in expected]
    record_lines = [int(s.origin.rsplit(":", 1)[1]) for s in pretty.sentences]
    starts = [i for i, line in enumerate(document.splitlines(), start=1) if line.lstrip(" [").startswith("{")]
    assert record_lines == (starts if layout != "compact array" else [1, 1, 1])


def test_cluener_nested_entities_keep_the_outermost_with_one_warning(tmp_path, caplog):
    title = "《浙商银行与招商银行》"
    records = [{"text": title + "出版", "label": {"book": {title: [[0, 10]]},
                                                "company": {"浙商银行": [[1, 4]], "招商银行": [[6, 9]]}}},
               {"text": "北京大学", "label": {"organization": {"北京大学": [[0, 3]]}, "address": {"北京": [[0, 1]]},
                                          "government": {"北京大学": [[0, 3]]}}}]
    p = write(tmp_path, "nested.json", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    with caplog.at_level(logging.WARNING, logger="nerco_dist"):
        corpus = read_corpus(p)
    assert entities(corpus.sentences[0].tags) == [Entity(0, 11, "book")]
    assert entities(corpus.sentences[1].tags) == [Entity(0, 4, "government")]  # same span: the first type by name
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{p}: 4 entities nested in or overlapping another were dropped (the outermost kept)"]


@pytest.mark.parametrize("record,problem", [
    ('{"text": "浙商银行", "label": ["company"]}', '"label" must be an object'),
    ('{"text": "浙商银行", "label": {"company": ["浙商银行"]}}', "type 'company' must map each mention"),
    ('{"text": "浙商银行", "label": {"company": {"浙商银行": [0, 3]}}}', "must be [[start, end_inclusive]"),
    ('{"text": "浙商银行", "label": {"company": {"浙商银行": [[0, 3, 4]]}}}', "must be [[start, end_inclusive]"),
    ('{"text": 12, "label": {}}', '"text" must be a string, got 12'),
    ('{"label": {}}', '"text" must be a string, got null'),
    ('{"text": "浙商银行", "label": {"": {"浙商银行": [[0, 3]]}}}', "entity type '' is empty"),
    ('{"text": "浙商银行", "label": {" ": {"浙商银行": [[0, 3]]}}}', "entity type ' ' is empty or has a space"),
    ('["浙商银行"]', "expected an object"),
])
def test_cluener_wrong_shapes_name_file_and_line(tmp_path, record, problem):
    """In JSON lines and in a pretty-printed document alike: the file, the line where the record starts."""
    good, bad = CLUENER_RECORDS[0], json.loads(record)
    pretty_good = json.dumps(good, ensure_ascii=False, indent=2)
    for name, content, line in (
            ("lines.json", f"{json.dumps(good, ensure_ascii=False)}\n\n{record}\n", 3),
            ("pretty.json", f"{pretty_good}\n{json.dumps(bad, ensure_ascii=False, indent=2)}\n",
             pretty_good.count("\n") + 2)):
        p = write(tmp_path, name, content)
        with pytest.raises(InputError) as err:
            read_corpus(p)
        assert str(err.value).startswith(f"{p}:{line}: bad CLUENER record: ") and problem in str(err.value)


def test_cluener_json_errors_name_their_line(tmp_path):
    with pytest.raises(InputError, match="Expecting ',' delimiter") as err:
        read_corpus(write(tmp_path, "bad.json", '[\n  {"text": "浙商"},\n  {"text": "银行"\n   "label": {}}\n]\n'))
    assert err.value.line == 4
    with pytest.raises(InputError, match="not closed") as err:
        read_corpus(write(tmp_path, "open.json", '[\n  {"text": "浙商"},\n  {"text": "银行"}\n'))
    assert err.value.line == 4


# --- tag schemes ------------------------------------------------------------------------------------


def random_entities(rng, n):
    spans, i = [], 0
    while i < n:
        if rng.random() < 0.3:
            length = rng.randint(1, 4)
            if i + length <= n:
                spans.append(Entity(i, i + length, rng.choice(["PER", "LOC", "ORG"])))
                i += length
                continue
        i += 1
    return spans


def convert(tags, scheme):
    """Any scheme to ``scheme`` through the entity spans: the reference the direct prefix map must agree with."""
    return from_entities(len(tags), entities(tags), scheme)


@pytest.mark.parametrize("seed", range(20))
def test_scheme_round_trips(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    spans = random_entities(rng, n)
    bio = from_entities(n, spans, "BIO")
    for scheme in ("BIOES", "BMES"):
        other = convert(bio, scheme)
        assert entities(other) == spans
        assert convert(other, "BIO") == bio
        assert to_bio(other) == bio  # the direct prefix map (S->B, M/E->I) agrees
    assert entities(bio) == spans


@pytest.mark.parametrize("seed", range(10))
def test_orphan_inside_repair_keeps_the_entities_and_counts_them(seed):
    rng = random.Random(seed)
    tags = [rng.choice(["O", "B-PER", "I-PER", "M-PER", "E-PER", "S-PER", "I-LOC", "E-LOC"]) for _ in range(30)]
    bio = to_bio(tags)
    repaired, count = repair_orphan_inside(bio)
    # reference: the entities conlleval reads from the BIO tags, counted where one starts on an I- tag
    assert count == sum(1 for e in entities(bio) if bio[e.start].startswith("I-"))
    assert entities(repaired) == entities(bio) and all(repaired[e.start].startswith("B-") for e in entities(bio))
    assert repair_orphan_inside(["I-PER", "I-PER", "O", "I-PER", "B-LOC", "I-PER", "I-LOC"]) == (
        ["B-PER", "I-PER", "O", "B-PER", "B-LOC", "B-PER", "B-LOC"], 4)


def test_a_training_file_with_an_orphan_inside_has_a_gold_path_the_constrained_crf_allows(tmp_path):
    """Read as written, O -> I-PER has probability zero under the BIO constraints: the loss would be
    infinite (the logged loss rose by about 10,000 a sentence); read as B-PER it is finite."""
    from nerco_dist.model.crf import bio_allowed_transitions, build_crf

    path = write(tmp_path, "train.bio", "甲 O\n乙 I-PER\n丙 I-PER\n\n丁 B-PER\n")
    sentence = read_corpus(path).sentences[0]
    labels = LabelSet.from_sentences([sentence])
    crf = build_crf(len(labels.labels), allowed=bio_allowed_transitions(labels.labels)).double()
    emissions = torch.zeros(1, 3, len(labels.labels), dtype=torch.float64)
    def nll(tags):
        return -crf(emissions, torch.tensor([labels.ids(tags)]), torch.ones(1, 3, dtype=torch.bool)).item()
    assert sentence.tags == ["O", "B-PER", "I-PER"] and nll(sentence.tags) < 10
    assert nll(["O", "I-PER", "I-PER"]) > 1e3  # what the tags as written would have cost


def test_scheme_detection_and_semantic_class():
    assert detect_scheme(["O", "B-PER", "I-PER"]) == "BIO"
    assert detect_scheme(["S-PER", "B-LOC", "I-LOC", "E-LOC"]) == "BIOES"
    assert detect_scheme(["B-LOC", "M-LOC", "E-LOC"]) == "BMES"
    assert [semantic_class(t) for t in ("B-PER", "I-PER", "M-PER", "E-PER", "S-PER", "O")] == ["PER"] * 5 + ["O"]
    # conlleval reading: an I- that does not continue its own type starts an entity
    assert entities(["O", "I-PER", "I-PER", "I-LOC", "B-LOC", "I-LOC"]) == [
        Entity(1, 3, "PER"), Entity(3, 4, "LOC"), Entity(4, 6, "LOC")]


# --- lexicon and lattice ----------------------------------------------------------------------------


def test_lexicon_matches_every_word_brute_force():
    words = ["南京", "南京市", "市长", "长江", "大桥", "长江大桥", "江大", "京市长江"]
    lex = Lexicon(words + ["x"])  # single characters are not lexicon words
    chars = list("南京市长江大桥")
    brute = sorted((i, j - 1, "".join(chars[i:j])) for i in range(len(chars)) for j in range(i + 2, len(chars) + 1)
                   if "".join(chars[i:j]) in set(words))
    assert sorted(lex.match(chars)) == brute
    assert len(Lexicon(["x", "ab"])) == 1


def test_jieba_default_lexicon_and_word2vec_lexicon(tmp_path):
    lex = Lexicon.load(None)
    assert lex.source == "jieba" and len(lex) > 100_000 and "长江大桥" in lex.words
    vec = write(tmp_path, "w.vec", "3 2\n南京 0.1 0.2\n长江 0.3 0.4\n大 0.5 0.6\n")
    assert Lexicon.load(str(vec)).words == {"南京", "长江"}
    index, matrix = read_word2vec(vec)
    assert index["长江"] == 1 and matrix.shape == (3, 2)
    with pytest.raises(InputError, match="expected 2 values") as err:
        read_word2vec(write(tmp_path, "bad.vec", "南京 0.1 0.2\n长江 0.3\n"))
    assert err.value.line == 2


def test_piece_spans_prefer_sentence_then_clause_ends_and_keep_entities():
    chars = list("甲乙。丙丁，戊己庚辛")
    assert piece_spans(chars, 5) == [(0, 3), (3, 6), (6, 10)]
    assert piece_spans(chars, 100) == [(0, 10)]
    # a protected span covering the only punctuation forces a cut elsewhere, never inside it
    pieces = piece_spans(chars, 4, protected=[Entity(1, 4, "X")])
    assert all(not (s < c < e) for c, _ in pieces[1:] for s, e in [(1, 4)])
    assert pieces[0][0] == 0 and pieces[-1][1] == len(chars)
    assert all(b == c for (_, b), (c, _) in zip(pieces, pieces[1:]))


def test_an_entity_longer_than_max_len_is_cut_like_plain_text():
    chars = list("甲乙丙丁戊己庚辛壬癸")
    # by hand, max_len 3: the cut before the entity (2), then every 3 characters inside it, as plain text is cut
    assert piece_spans(chars, 3, protected=[Entity(2, 10, "X")]) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    # inside an over-long entity a clause end is still preferred
    chars[5] = "，"
    assert piece_spans(chars, 4, protected=[Entity(1, 10, "X")]) == [(0, 1), (1, 5), (5, 6), (6, 10)]


LONG_ORG = "北京大学人民医院" * 1000  # 8,000 characters
LONG_ORG_WORDS = ["北京", "北京大学", "人民", "医院", "人民医院", "大学"]


def corpus_with_over_long_entities(tmp_path):
    """A BIO file as a missing end tag makes one: an 8,000-character ORG, a 100-character one beside an entity
    that fits, and a sentence that needs no cut."""
    def lines(text, *spans):
        return "".join(f"{c} {t}\n" for c, t in zip(text, from_entities(len(text), spans))) + "\n"
    return write(tmp_path, "long.bio", lines("张三在" + LONG_ORG + "。", Entity(0, 2, "PER"), Entity(3, 8003, "ORG"))
                 + lines("在" + LONG_ORG[:100] + "，见李四。", Entity(1, 101, "ORG"), Entity(103, 105, "PER"))
                 + lines("李四在北京。", Entity(0, 2, "PER"), Entity(3, 5, "LOC")))


def test_a_training_file_with_an_8000_character_entity_gives_pieces_of_at_most_max_len(tmp_path, caplog):
    path = corpus_with_over_long_entities(tmp_path)
    sentences = read_corpus(path).sentences
    lex = Lexicon(LONG_ORG_WORDS)
    enc = LatticeEncoder(Vocabs.build(sentences, lex), lex, LabelSet.from_sentences(sentences), max_len=60)
    with caplog.at_level(logging.WARNING, logger="nerco_dist"):
        pieces = enc.encode(sentences, split_on_entities=True)
    assert max(p.num_chars for p in pieces) == 60
    # by hand: 张三在 | 133 pieces of 60 inside the ORG | its last 20 characters and 。; 在 | 60 | 45; one piece
    assert [sum(p.sentence == k for p in pieces) for k in range(3)] == [135, 3, 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{path}: 2 entities longer than data.max_len=60 characters were cut into pieces (the part "
                        "after each cut begins with B-)"]
    for k, s in enumerate(sentences):
        mine = [p for p in pieces if p.sentence == k]
        spans = [(p.start, p.start + p.num_chars) for p in mine]
        assert spans[0][0] == 0 and spans[-1][1] == len(s) and all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))
        tags = [[enc.labels.labels[i] for i in p.label_ids] for p in mine]
        assert all(is_valid_bio(t) for t in tags)
        # reference: each gold entity clipped to every piece it overlaps; one that fits lies in a single piece
        clipped = [Entity(max(e.start, a), min(e.end, b), e.type) for e in entities(s.tags) for a, b in spans
                   if max(e.start, a) < min(e.end, b)]
        got = [Entity(p.start + e.start, p.start + e.end, e.type) for p, t in zip(mine, tags) for e in entities(t)]
        assert got == sorted(clipped)
        fits = [e for e in entities(s.tags) if e.end - e.start <= 60]
        assert all(e in got for e in fits)


CAPPED_STEP = """
import json, resource, sys
import torch
from nerco_dist.data.dataset import LabelSet, LatticeEncoder, Vocabs, collate
from nerco_dist.data.lexicon import Lexicon
from nerco_dist.data.readers import read_corpus
from nerco_dist.inference import predict_tags
from nerco_dist.model.build import build_tagger
from nerco_dist.model.config import ModelConfig

def vm(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))

torch.set_num_threads(1)
path, headroom, words = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
before = vm("VmSize")
resource.setrlimit(resource.RLIMIT_AS, (before + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
sentences = read_corpus(path).sentences
lexicon = Lexicon(words)
codec = LatticeEncoder(Vocabs.build(sentences, lexicon), lexicon, LabelSet.from_sentences(sentences), max_len=60)
model = build_tagger(codec, ModelConfig(char_dim=16, bigram_dim=16, word_dim=16, hidden=32, heads=2, head_dim=16,
                                        ff_ratio=2))
pieces = codec.encode(sentences, split_on_entities=True)
batch = collate(sorted(pieces, key=lambda p: p.lattice_len)[-8:])
model.head.nll(model.encode(batch), batch["labels"], batch["char_mask"]).backward()
predicted = predict_tags(codec, model, sentences, 8, torch.device("cpu"))
print(json.dumps(dict(predicted=[len(t) for t in predicted], grown=vm("VmPeak") - before)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_training_and_predicting_an_8000_character_entity_fit_a_fixed_memory_cap(tmp_path):
    """The reader, the training cut, one forward/backward of the longest training pieces and prediction of
    every sentence, under an address-space cap of 512 MiB above what the imports took. One 8,000-character
    piece (its lattice has about 14,000 nodes) would need 1.5 GiB for its (L, L) position index alone."""
    path = corpus_with_over_long_entities(tmp_path)
    headroom = 512 << 20
    proc = subprocess.run([sys.executable, "-c", CAPPED_STEP, str(path), str(headroom), *LONG_ORG_WORDS],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["predicted"] == [len(s) for s in read_corpus(path).sentences]  # every character predicted
    assert result["grown"] < headroom / 2


def is_valid_bio(tags):
    """Every I-X follows B-X or I-X (so the first tag of a piece is never I-)."""
    return all(not t.startswith("I-") or (i > 0 and tags[i - 1] in (f"B-{t[2:]}", t)) for i, t in enumerate(tags))


def test_encoder_and_collate_layout():
    lex = Lexicon(["南京", "南京市", "长江", "长江大桥"])
    train = [Sentence(list("南京市长江大桥"), ["B-LOC", "I-LOC", "I-LOC", "O", "O", "O", "O"])]
    labels = LabelSet.from_sentences(train)
    assert labels.labels == ("O", "B-LOC", "I-LOC") and labels.label_to_class() == [0, 1, 1]
    enc = LatticeEncoder(Vocabs.build(train, lex), lex, labels, max_len=200)
    short = Sentence(list("长江"), ["O", "O"])
    pieces = enc.encode(train + [short])
    batch = collate(pieces, labels.label_to_class())
    # sentence 0: 7 characters then 南京(0,1) 南京市(0,2) 长江(3,4) 长江大桥(3,6)
    assert batch["heads"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 0, 3, 3]
    assert batch["tails"][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 1, 2, 4, 6]
    assert batch["is_char"][0].tolist() == [True] * 7 + [False] * 4
    assert batch["lattice_mask"][1].tolist() == [True] * 3 + [False] * 8  # 长江 + its word
    assert batch["class_ids"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert enc.vocabs.bigrams.lookup(char_bigrams(list("南京")))[0] == pieces[0].bigram_ids[0]


class CountingLexicon(Lexicon):
    def __init__(self, words):
        super().__init__(words)
        self.calls = 0

    def match(self, chars):
        self.calls += 1
        return super().match(chars)


def per_piece_reference(lex, sentence, pieces):
    """What each piece's lattice words are when the piece alone is matched (the encoder before the change)."""
    out = []
    for p in pieces:
        found = Lexicon.match(lex, sentence.chars[p.start : p.start + p.num_chars])
        out.append(([m.head for m in found], [m.tail for m in found], [m.word for m in found]))
    return out


def test_each_sentence_is_matched_once_and_its_pieces_get_what_matching_them_alone_finds():
    lex = CountingLexicon(["南京", "南京市", "长江", "长江大桥", "江大", "大桥", "市长"])
    train = [Sentence(list("南京市长江大桥，南京"), ["O"] * 10), Sentence(list("长江"), ["O", "O"])]
    vocabs = Vocabs.build(train, lex)
    assert lex.calls == 2
    enc = LatticeEncoder(vocabs, lex, LabelSet.from_sentences(train), max_len=4)
    lex.calls = 0
    pieces = enc.encode(train)
    assert lex.calls == 2  # one match per sentence, not per piece
    # 南京市长 | 江大桥， | 南京: 长江 and 长江大桥 cross the first cut, so the pieces hold fewer words
    assert [(p.sentence, p.start, p.num_chars) for p in pieces] == [(0, 0, 4), (0, 4, 4), (0, 8, 2), (1, 0, 2)]
    assert sum(len(p.word_ids) for p in pieces[:3]) == len(Lexicon.match(lex, train[0].chars)) - 2
    for k, s in enumerate(train):
        mine = [p for p in pieces if p.sentence == k]
        got = [(p.word_heads, p.word_tails, p.word_ids) for p in mine]
        want = [(h, t, vocabs.words.lookup(w)) for h, t, w in per_piece_reference(lex, s, mine)]
        assert got == want
    # matches computed once serve both the vocabularies and the encoding
    lex.calls = 0
    matches = lexicon_matches(train, lex)
    again = LatticeEncoder(Vocabs.build(train, lex, matches=matches), lex, enc.labels, max_len=4)
    assert [vars(p) for p in again.encode(train, matches=matches)] == [vars(p) for p in pieces]
    assert again.vocabs.state_dict() == vocabs.state_dict() and lex.calls == 2
    with pytest.raises(ValueError, match="1 lexicon match lists for 2 sentences"):
        enc.encode(train, matches=matches[:1])


def test_training_pieces_of_a_real_corpus_match_per_piece_matching(data_root):
    lex = Lexicon.load(None)
    train = read_corpus(data_root / "weibo/weiboNER_2nd_conll.train").sentences[:300]
    enc = LatticeEncoder(Vocabs.build(train, lex), lex, LabelSet.from_sentences(train), max_len=20)
    pieces = enc.encode(train, split_on_entities=True)
    assert len(pieces) > 2 * len(train)
    for k, s in enumerate(train):
        mine = [p for p in pieces if p.sentence == k]
        got = [(p.word_heads, p.word_tails, p.word_ids) for p in mine]
        assert got == [(h, t, enc.vocabs.words.lookup(w)) for h, t, w in per_piece_reference(lex, s, mine)]


def test_label_ids_and_label_set_identity():
    labels = LabelSet(("O", "B-LOC", "I-LOC", "B-PER", "I-PER"))
    tags = ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-LOC"]
    assert labels.ids(tags) == [labels.labels.index(t) for t in tags]
    same = LabelSet(tuple(labels.labels))
    assert same == labels and hash(same) == hash(labels) and "index" not in repr(labels)


def test_length_bucket_sampler_covers_everything_once_and_repeats():
    lengths = [random.Random(i).randint(1, 100) for i in range(103)]
    s = LengthBucketBatchSampler(lengths, 8, seed=3, pool_batches=4)
    s.set_epoch(2)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(103)) and len(batches) == len(s)
    assert batches == list(s)  # same (seed, epoch) -> same order
    s.set_epoch(3)
    assert list(s) != batches
    # within a pool, batches are contiguous in length order: each batch's spread is small
    sorted_spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    rng = random.Random(0)
    order = list(range(103))
    rng.shuffle(order)
    random_spread = sum(max(lengths[i] for i in order[k:k + 8]) - min(lengths[i] for i in order[k:k + 8])
                        for k in range(0, 103, 8))
    assert sorted_spread < random_spread / 2


@pytest.mark.parametrize("n", [1, 5, 103, 104])
def test_length_bucket_sampler_gives_each_step_the_same_batches_on_any_ranks_x_accumulation(n):
    """An optimizer step takes ranks x accumulation batches: every rank has whole steps of its own, the epoch
    is padded (by repeating its first batches) to whole steps, and step k's batches are the one-process
    epoch's, whichever ranks x accumulation make up the same count."""
    lengths = [random.Random(i).randint(1, 100) for i in range(n)]
    one = LengthBucketBatchSampler(lengths, 8, seed=3, pool_batches=4)
    one.set_epoch(1)
    epoch = list(one)  # the one-process, one-batch-a-step epoch
    for per_step in (2, 4, 6):
        layouts = {}
        for ranks in (r for r in (1, 2, 3, 4, 6) if per_step % r == 0):
            accum = per_step // ranks
            samplers = [LengthBucketBatchSampler(lengths, 8, seed=3, pool_batches=4, rank=r, world_size=ranks,
                                                 grad_accum=accum) for r in range(ranks)]
            for s in samplers:
                s.set_epoch(1)
            per_rank = [list(s) for s in samplers]
            assert all(len(b) == len(s) and len(b) % accum == 0 for b, s in zip(per_rank, samplers))
            steps = len(per_rank[0]) // accum
            assert steps == -(-len(epoch) // per_step)  # whole steps, the last one padded
            # step k: accumulation micro-batch m of rank r is the epoch's batch k * per_step + m * ranks + r
            layouts[ranks] = [sorted(map(tuple, (per_rank[r][k * accum + m] for m in range(accum)
                                                 for r in range(ranks)))) for k in range(steps)]
            padded = [epoch[i % len(epoch)] for i in range(steps * per_step)]
            assert layouts[ranks] == [sorted(map(tuple, padded[k * per_step:(k + 1) * per_step]))
                                      for k in range(steps)]
        assert len(layouts) >= 2


def test_lines_break_at_cr_lf_and_crlf_only_so_other_separators_are_tokens(tmp_path):
    """U+2028 and U+0085 (breaks to ``str.splitlines``) are characters of the sentence; a lone CR ends a line
    as LF and CRLF do, so line numbers are those of an editor that honours all three."""
    path = tmp_path / "c.bmes"
    path.write_bytes("北 B-LOC\r\n京 E-LOC\r\u2028 O\n\u0085 O\n\n上 S-LOC\r\n".encode("utf-8"))
    sentences = read_corpus(path).sentences
    assert [s.chars for s in sentences] == [["北", "京", "\u2028", "\u0085"], ["上"]]
    assert sentences[0].tags == ["B-LOC", "I-LOC", "O", "O"] and sentences[1].origin == f"{path}:6"
    path.write_bytes("北 B-LOC\r京 X-LOC\r".encode("utf-8"))
    with pytest.raises(InputError) as err:
        read_corpus(path)
    assert err.value.line == 2


@pytest.mark.parametrize("tags", [["B-PER", "E-PER", "E-PER"], ["S-PER", "E-PER"], ["B-PER", "E-PER", "M-PER", "E-PER"],
                                  ["S-LOC", "S-LOC", "B-LOC", "E-LOC"]])
def test_bmes_read_as_bio_keeps_the_entities_the_file_has(tmp_path, tags):
    """An E- or S- followed by more of its type ends an entity in BMES, as conlleval reads it: in BIO the next
    one begins with B-, not I- (which would join the two)."""
    path = tmp_path / "c.bmes"
    path.write_text("".join(f"字 {t}\n" for t in tags) + "\n中 M-ORG\n", encoding="utf-8")  # M-: BMES
    read = read_corpus(path).sentences[0].tags
    assert entities(read) == entities(tags) and detect_scheme(read) == "BIO"
    assert read == from_entities(len(tags), entities(tags), "BIO")


def test_a_training_split_the_dev_slice_empties_is_refused(tmp_path):
    one = tmp_path / "one.bmes"
    one.write_text("北 B-LOC\n京 I-LOC\n", encoding="utf-8")
    with pytest.raises(InputError, match="no training sentences left beside the dev slice"):
        read_splits(one, None, None)


def test_holdout_split_is_seeded_and_disjoint():
    sents = [Sentence([str(i)], ["O"]) for i in range(100)]
    a_train, a_dev = holdout_split(sents, 0.1, seed=5)
    b_train, b_dev = holdout_split(sents, 0.1, seed=5)
    assert [s.chars for s in a_dev] == [s.chars for s in b_dev] and len(a_dev) == 10
    assert {s.chars[0] for s in a_train} | {s.chars[0] for s in a_dev} == {str(i) for i in range(100)}
    assert not {s.chars[0] for s in a_train} & {s.chars[0] for s in a_dev}


def test_labels_unknown_at_encode_time():
    train = [Sentence(list("甲乙"), ["B-PER", "I-PER"])]
    lex = Lexicon([])
    enc = LatticeEncoder(Vocabs.build(train, lex), lex, LabelSet.from_sentences(train), 10)
    with pytest.raises(ValueError, match="dev sentence 1: label 'B-LOC' is not in the training label set"):
        enc.encode([Sentence(list("丙"), ["B-LOC"])], source="dev ")
    assert torch.equal(collate(enc.encode(train))["labels"], torch.tensor([[1, 2]]))


def test_unknown_label_is_reported_at_its_file_and_line(tmp_path):
    train = [Sentence(list("甲乙"), ["B-PER", "I-PER"])]
    lex = Lexicon([])
    enc = LatticeEncoder(Vocabs.build(train, lex), lex, LabelSet.from_sentences(train), 10)
    dev = write(tmp_path, "dev.bio", "甲 B-PER\n乙 I-PER\n\n\n丙 O\n丁 B-LOC\n")
    with pytest.raises(ValueError, match=re.escape(f"{dev}:5: label 'B-LOC' is not in the training label set")):
        enc.encode(read_corpus(dev).sentences)


def test_trained_rows_start_pretrained_or_random_and_frozen_rows_are_the_file(tmp_path):
    import numpy as np

    from nerco_dist.data.vocab import PretrainedVectors, Vocabulary, embedding_matrices

    vec = write(tmp_path, "c.vec", "3 3\n中 1 2 3\n国 4 5 6\n天 0 3 4\n")
    vocab = Vocabulary(["国", "人"]).with_frozen(["中", "国", "天"])  # 国 is trained already
    assert vocab.itos == ["<pad>", "<unk>", "国", "人", "中", "天"] and (vocab.num_trained, vocab.num_frozen) == (4, 2)
    pretrained = PretrainedVectors.read(str(vec), 3)
    trained, frozen = embedding_matrices(vocab, 3, pretrained, np.random.default_rng(0))
    assert trained.shape == (4, 3) and not trained[0].any()  # <pad> row is zero
    assert trained[vocab["国"]].tolist() == [4, 5, 6] and frozen.tolist() == [[1, 2, 3], [0, 3, 4]]
    assert np.abs(trained[vocab["人"]]).max() <= np.sqrt(3 / 3)  # not in the file: uniform random
    unit_trained, unit_frozen = embedding_matrices(vocab, 3, pretrained, np.random.default_rng(0), normalize=True)
    assert np.allclose(unit_frozen[1], [0, 0.6, 0.8]) and np.allclose(unit_trained[2], np.array([4, 5, 6]) / 77 ** 0.5)
    assert np.allclose(np.linalg.norm(unit_trained[1:], axis=1), 1) and not unit_trained[0].any()
    with pytest.raises(ValueError, match="dimension 3"):
        PretrainedVectors.read(str(vec), 5)


