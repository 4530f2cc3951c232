"""Generated tables inside hand-written documents, between two marker comments.

The performance and offline-evaluation tables are generated from committed JSON and
checked by unit tests to equal the generator's output; the prose around them stays
hand-written. Both documents use this one pair of functions with their own markers.
"""

from __future__ import annotations


def table_in(doc: str, begin: str, end: str) -> str:
    """The generated text of a document: what stands between ``begin`` and ``end``."""
    _, found_begin, rest = doc.partition(begin)
    table, found_end, _ = rest.partition(end)
    if not (found_begin and found_end):
        msg = f"no generated table in the document: it needs the lines {begin} and {end}"
        raise ValueError(msg)
    return table.strip("\n")


def with_table(doc: str, table: str, begin: str, end: str) -> str:
    """``doc`` with its generated text replaced by ``table``."""
    table_in(doc, begin, end)  # raises when the document has no place for it
    head, _, rest = doc.partition(begin)
    return f"{head}{begin}\n{table}\n{end}{rest.partition(end)[2]}"
