"""The demo's web corpus: a small web with known ground truth, in the real input formats of the WIT build.

    corpus = write_corpus("data/demo/corpus", images_per_concept=12)
    with serve(corpus.www) as base_url:
        corpus.write_wat(base_url)          # Common Crawl WAT files pointing at the served pages
        ...                                 # build_wit.py reads corpus.wat_dir, crawls base_url

What is in it (every image rendered by pipelines/synthetic.py, so each one's concept is known):
- `www/siteK/pageN.html`: HTML pages with `<img src=... alt=...>`; sites mix descriptive file names
  (`red-circle-3.jpg`) with camera names (`IMG_4821.jpg`, alt text = the file name), English alt text
  with some French, German and Spanish, the same image linked from two pages (URL duplicates), the same
  bytes under a second URL (content duplicates), and links to images that do not exist (broken); and the
  noise only a model can see: alt texts that describe another image (mismatched captions) and near-duplicates
  (the same render re-encoded, resized or cropped under another URL, with a caption of its own).
- `wat/siteK.warc.wat.gz`: the WAT records of those pages (relative `src` resolved against the page), written
  for the server's base URL because the port is only known once it listens.
- `wiki/enwiki-demo-pages-articles.xml.bz2`, `wiki/pageviews-demo.gz`, `wiki/wordnet/`: a tiny Wikipedia
  dump, page-view file and WordNet database about shapes and colours, so the query list is built for real.
- Held out, none of it on the web: new renders of every concept, filed per label set for zero-shot
  evaluation: `heldout/seen/colour/<colour>/`, `heldout/seen/shape/<shape>/` (combinations the web shows),
  `heldout/novel/colour/...`, `heldout/novel/shape/...` (the `novel_combos` colour-shape pairs that no page
  shows, so no training caption names them together), `heldout/images/<colour shape>/` (all 48, for
  information), with prompt templates per label set (`heldout/templates_<set>.txt`) and
  `heldout/captions.jsonl` (retrieval).
- `truth.json`: per image URL its concept, language and expected fate (kept, or why it should be dropped),
  and `noise` ("mismatched_caption" or "near_duplicate") where a CLIP filter should drop a kept image.

Generation is deterministic for a seed and skipped when `truth.json` already matches the parameters.
"""

from __future__ import annotations

import contextlib
import html
import http.server
import json
import random
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines import synthetic
from pipelines.wit.formats import (
    Synset,
    WatPage,
    write_mediawiki_dump,
    write_pageviews,
    write_wat,
    write_wordnet,
)

LANGUAGES = ("fr", "de", "es")
CAMERA_NAMES = ("IMG_{n:04d}", "DSC{n:05d}", "2016{n:04d}_113957", "PXL_2021{n:04d}_101010")


@dataclass
class CorpusParams:
    images_per_concept: int = 12
    heldout_per_concept: int = 6
    image_size: int = 64
    sites: int = 4
    images_per_page: int = 8
    non_english: float = 0.08  # share of alt texts in French, German or Spanish
    camera_names: float = 0.06  # share of images with a camera file name as alt text
    duplicate_urls: float = 0.04  # share of images linked from a second page as well
    duplicate_bytes: float = 0.03  # share of images also served under a second URL
    broken_links: float = 0.04  # links to images that are not there, as a share of all images
    # Noise a text-only build keeps and a CLIP filter should remove (jobs/filter_wit.py), drawn from a stream of
    # their own so the rest of the corpus does not change with them:
    mismatched_captions: float = (
        0.15  # English alt texts that describe another image (colour and shape differ)
    )
    near_duplicates: float = 0.05  # images also served re-encoded, resized or cropped under another URL
    novel_combos: int = 8  # colour-shape pairs kept off the web (one per colour), evaluated as unseen pairs
    seed: int = 0


@dataclass
class Corpus:
    root: Path
    params: CorpusParams
    pages: dict[str, list[dict]] = field(default_factory=dict)  # site -> [{"page": path, "images": [...]}]

    @property
    def www(self) -> Path:
        return self.root / "www"

    @property
    def wat_dir(self) -> Path:
        return self.root / "wat"

    @property
    def wiki_dump(self) -> Path:
        return self.root / "wiki" / "enwiki-demo-pages-articles.xml.bz2"

    @property
    def pageviews(self) -> Path:
        return self.root / "wiki" / "pageviews-demo.gz"

    @property
    def wordnet(self) -> Path:
        return self.root / "wiki" / "wordnet"

    @property
    def heldout_images(self) -> Path:
        return self.root / "heldout" / "images"

    @property
    def heldout_captions(self) -> Path:
        return self.root / "heldout" / "captions.jsonl"

    @property
    def heldout(self) -> Path:
        return self.root / "heldout"

    def label_set(self, split: str, attribute: str) -> Path:
        """Image folder of held-out renders by `attribute` ("colour", "shape"); split "seen" or "novel"."""
        return self.heldout / split / attribute

    def templates(self, attribute: str) -> Path:
        """Prompt templates for a label set ("colour", "shape", "combo")."""
        return self.heldout / f"templates_{attribute}.txt"

    @property
    def class_names(self) -> list[str]:
        return sorted({c.label for c in synthetic.CONCEPTS})

    @property
    def novel(self) -> list[synthetic.Concept]:
        return novel_concepts(self.params.novel_combos)

    def truth(self) -> dict:
        return json.loads((self.root / "truth.json").read_text())

    def write_wat(self, base_url: str) -> Path:
        """One WAT file per site, for the pages as served at `base_url`."""
        self.wat_dir.mkdir(parents=True, exist_ok=True)
        for site, pages in self.pages.items():
            wat_pages = [
                WatPage(
                    url=f"{base_url}/{p['page']}",
                    images=[{"url": img["src"], "alt": img["alt"]} for img in p["images"]],
                    title=p["title"],
                )
                for p in pages
            ]
            write_wat(self.wat_dir / f"{site}.warc.wat.gz", wat_pages)
        return self.wat_dir


def _file_name(concept: synthetic.Concept, i: int, camera: bool, rng: random.Random) -> str:
    if camera:
        return rng.choice(CAMERA_NAMES).format(n=rng.randint(1000, 9999)) + ".jpg"
    return f"{concept.colour}-{concept.shape}-{i}.jpg"


def _alt_text(
    sample: synthetic.SyntheticSample, name: str, camera: bool, lang: str, rng: random.Random
) -> str:
    if camera:
        return name.rsplit(".", 1)[0]  # alt text that is just the camera's file name
    if lang != "en":
        return synthetic.caption_for(sample.concept, rng, language=lang)
    return sample.caption


def _wiki_articles(rng: random.Random) -> list[tuple[str, str]]:
    """Articles whose words repeat often enough for the query list (unigrams, PMI bigrams, titles)."""
    articles = []
    for shape in synthetic.SHAPES:
        sentences = []
        for colour in synthetic.COLOURS:
            sentences += [
                f"A {colour} {shape} is a common sign.",
                f"The [[{colour}]] {shape} appears on many flags and in [[art|artworks]].",
                f"Children often draw a {colour} {shape} on paper.",
            ]
        rng.shuffle(sentences)
        text = f"'''{shape.title()}''' is a [[shape]].\n" + " ".join(sentences) + "\n{{Infobox shape}}\n"
        articles.append((shape.title(), text))
    for colour in synthetic.COLOURS:
        text = f"'''{colour.title()}''' is a [[colour]]. " + " ".join(
            f"The {colour} {shape} is drawn in {colour} paint." for shape in synthetic.SHAPES
        )
        articles.append((colour.title(), text))
    return articles


def novel_concepts(n: int) -> list[synthetic.Concept]:
    """`n` colour-shape pairs, colour i with shape i mod 6: every colour and shape is still on the web."""
    colours = list(synthetic.COLOURS)
    return [synthetic.Concept(colours[i], synthetic.SHAPES[i % len(synthetic.SHAPES)]) for i in range(n)]


# Caption-style prompts without an article ("a orange"): a class is the mean over the other attribute.
_PROMPTS = ("simple picture: {}", "{} on a light background", "{}, clip art", "a photo of {}.")


def _templates(attribute: str) -> list[str]:
    if attribute == "colour":
        return [p.format("{} " + shape) for shape in synthetic.SHAPES for p in _PROMPTS]
    if attribute == "shape":
        return [p.format(colour + " {}") for colour in synthetic.COLOURS for p in _PROMPTS]
    return [p.format("{}") for p in _PROMPTS]


def _other_caption(concept: synthetic.Concept, concepts: list, rng: random.Random) -> str:
    """A caption of a concept whose colour and shape both differ from `concept`'s."""
    others = [c for c in concepts if c.colour != concept.colour and c.shape != concept.shape]
    return synthetic.caption_for(rng.choice(others), rng)


def _add_noise(
    corpus: Corpus, image: dict, sample, jpg: bytes, concepts: list, rng: random.Random
) -> list[dict]:
    """Mismatch `image`'s caption, or add a near-duplicate copy of it (returned), per the noise shares. The
    build keeps both (fate "kept"); `noise` says what a CLIP filter should drop."""
    from pipelines.noisy_corpus import near_duplicate

    params = corpus.params
    if image["fate"] != "kept":
        return []
    if rng.random() < params.mismatched_captions:
        image.update(alt=_other_caption(sample.concept, concepts, rng), noise="mismatched_caption")
        return []
    if rng.random() >= params.near_duplicates:
        return []
    variant = rng.choice(("jpeg", "resize", "crop"))
    site, name = image["path"].split("/img/", 1)
    copy = f"{site}/img/{variant}-{name}"
    (corpus.www / copy).write_bytes(near_duplicate(sample.image, jpg, variant, rng))
    caption = synthetic.caption_for(sample.concept, rng)
    return [{**image, "path": copy, "alt": caption, "caption_en": caption, "noise": "near_duplicate"}]


def _write_images(corpus: Corpus, concepts: list, rng: random.Random) -> list[dict]:
    """The web's images (with duplicates by bytes, broken links, mismatched captions and near-duplicates),
    each with its fate, shuffled."""
    params = corpus.params
    noise_rng = random.Random(params.seed * 7919 + 17)
    images: list[dict] = []  # every image on the web, with its fate
    samples = synthetic.generate(
        params.images_per_concept * len(concepts), seed=params.seed, size=params.image_size, concepts=concepts
    )
    for i, sample in enumerate(samples):
        site = f"site{i % params.sites}"
        camera = rng.random() < params.camera_names
        lang = rng.choice(LANGUAGES) if not camera and rng.random() < params.non_english else "en"
        name = _file_name(sample.concept, i, camera, rng)
        path = f"{site}/img/{name}"
        jpg = synthetic.to_jpeg(sample.image)
        (corpus.www / site / "img").mkdir(parents=True, exist_ok=True)
        (corpus.www / path).write_bytes(jpg)
        fate = "kept" if lang == "en" and not camera else ("auto_generated" if camera else "not_english")
        image = {"path": path, "alt": _alt_text(sample, name, camera, lang, rng), "label": sample.label,
                 "caption_en": sample.caption, "language": lang, "fate": fate}  # fmt: skip
        near_duplicates = _add_noise(corpus, image, sample, jpg, concepts, noise_rng)  # may mismatch `alt`
        images.append(image)
        if fate == "kept" and rng.random() < params.duplicate_bytes:
            copy = f"{site}/img/copy-{name}"
            (corpus.www / copy).write_bytes(jpg)
            images.append({**image, "path": copy, "fate": "duplicate_image"})
        images += near_duplicates
    n_broken = max(1, int(params.broken_links * len(images)))
    for j in range(n_broken):
        c = concepts[j % len(concepts)]
        site = f"site{j % params.sites}"
        images.append({"path": f"{site}/img/missing-{c.colour}-{c.shape}-{j}.jpg", "alt": f"a {c.colour} {c.shape}",
                       "label": c.label, "caption_en": "", "language": "en", "fate": "http_404"})  # fmt: skip
    rng.shuffle(images)
    return images


def _write_pages(corpus: Corpus, images: list[dict], rng: random.Random) -> None:
    """HTML gallery pages per site linking the images (some linked twice); sets `corpus.pages`."""
    params = corpus.params
    corpus.pages = {}
    for site_index in range(params.sites):
        site = f"site{site_index}"
        site_images = [im for im in images if im["path"].startswith(site + "/")]
        pages = []
        for k in range(0, len(site_images), params.images_per_page):
            chunk = site_images[k : k + params.images_per_page]
            pages.append({"page": f"{site}/page{k // params.images_per_page}.html", "title": f"Gallery {k}",
                          "images": [{"src": "img/" + im["path"].split("/img/", 1)[1], "alt": im["alt"]}
                                     for im in chunk]})  # fmt: skip
        for im in site_images:  # the same image (same URL) linked from a second page
            if im["fate"] == "kept" and rng.random() < params.duplicate_urls and len(pages) > 1:
                pages[rng.randrange(len(pages))]["images"].append(
                    {"src": "img/" + im["path"].split("/img/", 1)[1], "alt": im["alt"]}
                )
        for p in pages:
            body = "\n".join(
                f'<figure><img src="{html.escape(im["src"])}" alt="{html.escape(im["alt"])}"></figure>'
                for im in p["images"]
            )
            (corpus.www / p["page"]).write_text(
                f"<!doctype html><html><head><title>{p['title']}</title></head><body>{body}</body></html>",
                encoding="utf-8",
            )
        corpus.pages[site] = pages


def _write_query_sources(corpus: Corpus, rng: random.Random) -> None:
    """Wikipedia, page views and WordNet about the same concepts: the query list comes from them."""
    (corpus.root / "wiki").mkdir(parents=True, exist_ok=True)
    articles = _wiki_articles(rng)
    write_mediawiki_dump(corpus.wiki_dump, articles)
    views = [("en", title, 500) for title, _ in articles] + [("en", f"{c} {s}".title(), 120)
             for c in synthetic.COLOURS for s in synthetic.SHAPES] + [("de", "Kreis", 900)]  # fmt: skip
    write_pageviews(corpus.pageviews, views)
    synsets = [Synset("n", [s], f"a {s} shape") for s in synthetic.SHAPES]
    synsets += [Synset("a", [c], f"of the colour {c}") for c in synthetic.COLOURS]
    write_wordnet(corpus.wordnet, synsets)


def _write_heldout(corpus: Corpus, novel: set) -> None:
    """New renders (other seeds), never served; every concept the same number of times."""
    params = corpus.params
    captions = []
    for k, concept in enumerate(synthetic.CONCEPTS):
        split = "novel" if concept in novel else "seen"
        held = synthetic.generate(params.heldout_per_concept, seed=params.seed + 10_000 + k,
                                  size=params.image_size, concepts=[concept])  # fmt: skip
        for i, sample in enumerate(held):
            name = f"{k:02d}{i:04d}.jpg"
            folders = [corpus.heldout_images / sample.label]  # the folder name is the class name
            folders += [
                corpus.label_set(split, "colour") / concept.colour,
                corpus.label_set(split, "shape") / concept.shape,
            ]
            jpg = synthetic.to_jpeg(sample.image)
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(jpg)
            captions.append({"image": f"images/{sample.label}/{name}", "captions": [sample.caption]})
    corpus.heldout_captions.write_text("".join(json.dumps(c) + "\n" for c in captions), encoding="utf-8")
    for attribute in ("colour", "shape", "combo"):
        corpus.templates(attribute).write_text("\n".join(_templates(attribute)) + "\n", encoding="utf-8")


def write_corpus(root: str | Path, params: CorpusParams | None = None) -> Corpus:
    """Writes (or reuses) the corpus under `root`; deterministic for `params`."""
    params = params or CorpusParams()
    corpus = Corpus(Path(root), params)
    truth_path = corpus.root / "truth.json"
    if truth_path.exists():
        truth = json.loads(truth_path.read_text())
        if truth.get("params") == asdict(params):
            corpus.pages = truth["pages"]
            return corpus
    rng = random.Random(params.seed)  # one stream, drawn in this order: images, pages, query sources
    corpus.root.mkdir(parents=True, exist_ok=True)
    novel = set(novel_concepts(params.novel_combos))
    images = _write_images(corpus, [c for c in synthetic.CONCEPTS if c not in novel], rng)
    _write_pages(corpus, images, rng)
    _write_query_sources(corpus, rng)
    _write_heldout(corpus, novel)
    truth = {"params": asdict(params), "images": images, "pages": corpus.pages}
    truth_path.write_text(json.dumps(truth, indent=1), encoding="utf-8")
    return corpus


@contextlib.contextmanager
def serve(root: str | Path) -> Iterator[str]:
    """Serves `root` on 127.0.0.1 (a free port) from a thread; yields the base URL."""

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
