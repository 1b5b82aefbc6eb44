"""Text filters: language (multilingual), auto-generated names, lengths, URLs, exact dedupe."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipelines.wit.filters import FilterConfig, TextFilter, count_words, dedupe, is_auto_generated_name


@pytest.fixture(scope="module")
def text_filter():
    return TextFilter(FilterConfig())


def _run(f, pairs):
    batch = pa.table(
        {"url": [u for u, _ in pairs], "caption": [c for _, c in pairs], "page_url": [""] * len(pairs)}
    )
    return f(batch)


URL = "https://img.example.com/a/photo.jpg"


def test_english_kept_other_languages_dropped(text_filter):
    english = [
        "A brown dog running on the beach",
        "Chocolate cake with fresh strawberries",
        "The Eiffel Tower at night",
    ]
    others = [
        "Un chien brun qui court sur la plage",  # French
        "Ein brauner Hund läuft am Strand entlang",  # German
        "Un perro marrón corriendo en la playa",  # Spanish
        "一只 棕色的狗 在海滩上 奔跑",  # Chinese
        "كلب بني يركض على الشاطئ",  # Arabic
        "Le chien 一只狗 der Hund corre en la playa",  # mixed, no English
    ]
    out, dropped = _run(text_filter, [(URL, c) for c in english + others])
    assert out.column("caption").to_pylist() == english
    assert dropped == {"not_english": len(others)}


@pytest.mark.parametrize(
    "caption",
    [
        "IMG_1234",
        "DSC01234",
        "DSCN0042 (2)",
        "20160716_113957",
        "2016-07-16 11.39.57",
        "PXL_20210101_123456789",
        "d41d8cd98f00b204e9800998ecf8427e",
        "123e4567-e89b-12d3-a456-426614174000",
        "0023 4417 2231",
        "photo1",
        "Untitled-3",
        "image (2)",
        "Screenshot 2020",
        "Canon EOS 5D, 50mm, f/1.8, 1/200s, ISO 100",
        "_MG_1234",
        "IMG_E1234",
        "GH010034",
        "WhatsApp Image 2021-03-04 at 10.22.33",
        "Screen Shot 2019-04-12 at 3.45.21 PM",
        "Bildschirmfoto 2021-09-01 um 12.30.44",
        "Image 1 of 12",
        "tumblr_n8xk2oQ1Zv1qz6f9yo1_500",
        "Untitled design",
        "No image available",
    ],
)
def test_auto_generated_captions(text_filter, caption):
    assert text_filter.reason(URL, caption) == "auto_generated_caption"


@pytest.mark.parametrize(
    "caption",
    ["The iPhone 12 photo of a dog from 2019", "Image of the week: a red fox", "Route 66 at sunset"],
)
def test_natural_captions_with_digits_pass(text_filter, caption):
    assert text_filter.reason(URL, caption) is None


def test_filename_captions_and_url_names(text_filter):
    assert text_filter.reason(URL, "my holiday pic.jpg") == "caption_is_filename"
    assert text_filter.reason("https://x.org/sunset-beach.jpg", "Sunset Beach") == "caption_is_filename"
    camera_url = "https://x.org/u/IMG_20160716_113957.jpg"
    assert is_auto_generated_name("IMG_20160716_113957.jpg") and is_auto_generated_name(
        "a1b2c3d4e5f60718.png"
    )
    assert not is_auto_generated_name("golden-gate-bridge.jpg")
    assert text_filter.reason(camera_url, "A sailboat on the bay") is None  # off by default
    strict = TextFilter(FilterConfig(drop_auto_generated_filename=True))
    assert strict.reason(camera_url, "A sailboat on the bay") == "auto_generated_filename"
    assert strict.reason("https://x.org/golden-gate.jpg", "A sailboat on the bay") is None


def test_lengths_urls_and_bad_text(text_filter):
    cases = {
        "ftp://x.org/a.jpg": ("A brown dog on the beach", "bad_url_scheme"),
        "not a url": ("A brown dog on the beach", "bad_url_scheme"),
        "https://x.org/a.svg": ("A brown dog on the beach", "bad_url_extension"),
        "https://x.org/a.pdf": ("A brown dog on the beach", "bad_url_extension"),
        "https://x.org/thumb.php?id=3": ("A brown dog on the beach", None),
        "https://x.org/noext": ("A brown dog on the beach", None),
        "https://x.org/1.jpg": ("", "empty_caption"),
        "https://x.org/2.jpg": ("   \n ", "empty_caption"),
        "https://x.org/3.jpg": ("dog", "caption_too_short"),
        "https://x.org/4.jpg": ("word " * 20_000, "caption_too_long"),  # 100 kB
        "https://x.org/5.jpg": ("A dog \ufffd on the beach", "invalid_text"),
    }
    out, dropped = _run(text_filter, [(u, c) for u, (c, _) in cases.items()])
    for url, (caption, reason) in cases.items():
        assert text_filter.reason(url, " ".join(caption.split())) == reason, url
    assert out.num_rows == 2 and sum(dropped.values()) == len(cases) - 2
    normalised, _ = _run(text_filter, [(URL, "A  brown\n dog\ton the   beach ")])
    assert normalised.column("caption").to_pylist() == ["A brown dog on the beach"]


def test_dedupe_exact_and_order_independent():
    rows = [("u1", "b"), ("u1", "a"), ("u2", "x"), ("u1", "a"), ("u3", "y"), ("u2", "x")]
    table = pa.table({"url": [u for u, _ in rows], "caption": [c for _, c in rows], "page_url": [""] * 6})
    out, dropped = dedupe(table)
    assert dropped == {"duplicate_pair": 2, "duplicate_url": 1}
    assert sorted(zip(out.column("url").to_pylist(), out.column("caption").to_pylist())) == [
        ("u1", "a"),
        ("u2", "x"),
        ("u3", "y"),
    ]
    reversed_out, _ = dedupe(table.take(list(range(5, -1, -1))))
    assert reversed_out.equals(out)


DATA = Path(__file__).parent / "data"


@pytest.mark.parametrize("name, minimum", [("captions_labelled", 400), ("captions_heldout", 100)])
def test_labelled_real_world_captions_precision_and_recall(text_filter, name, minimum):
    """Hand-labelled alt-text-style captions (labels written for what a WIT curator wants, see
    tests/data/README.md; the held-out set was written after the filter was tuned on the first), each with
    a neutral URL so the file name cannot help."""
    rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= minimum
    urls = [f"https://img.example.net/a/{i:04d}" for i in range(len(rows))]
    reasons = text_filter.reasons(urls, [" ".join(r["caption"].split()) for r in rows])
    labelled_keep = [r["label"] == "keep" for r in rows]
    kept = [reason is None for reason in reasons]
    true_keep = sum(a and b for a, b in zip(labelled_keep, kept))
    precision, recall = true_keep / sum(kept), true_keep / sum(labelled_keep)
    assert precision >= 0.97 and recall >= 0.97, (precision, recall)
    dropped = [(r["reason"], got) for r, got in zip(rows, reasons) if r["label"] == "drop" and got]
    assert sum(want == got for want, got in dropped) / len(dropped) >= 0.95  # and for the labelled reason


@pytest.mark.parametrize(
    "caption, words",
    [
        ("A brown dog", 3),
        ("一只棕色的狗在海滩上奔跑", 6),  # 12 Han characters, no spaces
        ("東京の夜景", 3),
        ("สุนัขสีน้ำตาลวิ่งบนชายหาด", 7),  # Thai, 25 characters
        ("新款iPhone 15 Pro开箱", 5),
        ("Tokyo Tower (東京タワー)", 5),
    ],
)
def test_words_are_counted_in_scripts_without_spaces(caption, words):
    assert count_words(caption) == words


def test_sentences_without_spaces_are_not_english_rather_than_too_short(text_filter):
    for caption in ["北京故宫的冬天", "桜の下でお花見をする人々", "วัดพระแก้วในกรุงเทพ"]:
        out, dropped = _run(text_filter, [(URL, caption)])
        assert out.num_rows == 0 and dropped == {"not_english": 1}, caption


@pytest.mark.parametrize(
    "caption",
    [
        "Sony WH-1000XM4 wireless noise cancelling headphones",
        "NVIDIA GeForce RTX 4090 Founders Edition graphics card",
        "Oktoberfest beer tent crowded with visitors",
        "Tokyo Tower (東京タワー) lit up at night",
        "Canon EF 50mm f/1.8 STM lens on a white background",
        "BMW M3 E46",
    ],
)
def test_names_model_numbers_and_acronyms_stay_english(text_filter, caption):
    out, dropped = _run(text_filter, [(URL, caption)])
    assert out.num_rows == 1, dropped
