"""Concatenate indexed datasets (.bin/.idx prefixes) into one, in the order given.

    python tools/merge_datasets.py --input data/part1_text_document data/part2_text_document \\
        --output-prefix data/all_text_document

Every input is validated first; all must share one token dtype. The output is written under
temporary names and renamed when complete.
"""

import sys

from an_megatron.cli import ArgumentParser, output_prefix
from an_megatron.data.cli import run_tool


def main(argv=None) -> None:
    from an_megatron.data.merge import merge_datasets

    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", required=True, help="dataset prefixes (without .bin/.idx) to concatenate")
    parser.add_argument(
        "--output-prefix",
        type=output_prefix,
        required=True,
        help="writes {output-prefix}.bin and .idx (and .stats.json when every input has one)",
    )
    args = parser.parse_args(argv)
    info = merge_datasets(args.input, args.output_prefix)
    print(
        f"merged {len(args.input)} datasets: {info.num_documents} documents, "
        f"{info.num_tokens} tokens -> {args.output_prefix}.bin/.idx"
    )


if __name__ == "__main__":
    sys.exit(run_tool(main))
