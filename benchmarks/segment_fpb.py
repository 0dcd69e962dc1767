"""How well `finlora analyze` cuts prose into sentences, measured on Financial PhraseBank.

python benchmarks/segment_fpb.py [FILE]: joins FILE's sentences (default: AllAgree under
$FINLORA_FPB_DIR) five to a paragraph, with a heading every ten paragraphs, as a report would
hold them, then cuts the text with `finlora.report.segment` and counts the sentences that come
back exactly. FPB's own quirks (sentences that start in lower case, or that hold two) bound what
any splitter can recover.
"""

import os
import sys
from pathlib import Path

from finlora.data.documents import segment
from finlora.data.textfile import read_text

default = Path(os.environ.get("FINLORA_FPB_DIR", ".")) / "Sentences_AllAgree.txt"
path = Path(sys.argv[1]) if len(sys.argv) > 1 else default
lines = read_text(path).splitlines()
# White space as segment leaves it (runs of spaces made one), so only the cuts are compared.
sentences = [" ".join(line.rsplit("@", 1)[0].split()) for line in lines if "@" in line]
blocks = []
for i in range(0, len(sentences), 5):
    if i % 50 == 0:
        blocks.append(f"Section {i // 50 + 1}")
    blocks.append(" ".join(sentences[i : i + 5]))
parts = segment("\n\n".join(blocks))
cut = [s.text for s in parts.sentences]
distinct = set(sentences)
exact = len(distinct & set(cut))
print(f"{path.name}: {len(sentences)} sentences in {len(blocks)} blocks")
print(f"segment: {len(cut)} sentences, {parts.skipped} fragments skipped")
print(f"recovered exactly: {exact} of {len(distinct)} distinct ({exact / len(distinct):.1%})")
