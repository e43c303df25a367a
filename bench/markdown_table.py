"""What the bench scripts share: printing a Markdown table (run them as `python bench/NAME.py`,
which puts this folder on the import path)."""


def markdown(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
