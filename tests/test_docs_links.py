"""Citations of the project's own docs resolve: every `docs/<page>.md` named in the code exists,
and every `docs/<page>.md#anchor` names a heading of that page (GitHub's anchor rules)."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIPPED_DIRS = {".git", ".venv", "runs", "colabs", "__pycache__"}
DOC_LINK = re.compile(r"docs/([\w\-/]+\.md)(?:#([a-z0-9\-]+))?")


def _source_files():
  for dirpath, dirnames, filenames in os.walk(ROOT):
    dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
    for name in filenames:
      if name.endswith((".py", ".md", ".sh", ".sbatch")) or name in ("Makefile", "run"):
        yield os.path.join(dirpath, name)


def _github_anchor(heading: str) -> str:
  text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
  return text.replace(" ", "-")


def _anchors(page_path: str) -> set[str]:
  with open(page_path, encoding="utf-8") as f:
    text = f.read()
  text = re.sub(r"```.*?```", "", text, flags=re.S)  # '#' lines in code blocks are no headings
  return {_github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def test_github_anchor_rule():
  assert _github_anchor("VQ-KD quantizer") == "vq-kd-quantizer"
  assert _github_anchor("CAE v2 recipe and evaluation") == "cae-v2-recipe-and-evaluation"
  assert _github_anchor("k-CLIP tokens") == "k-clip-tokens"


def test_every_docs_link_resolves():
  broken = []
  cache = {}
  for path in _source_files():
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    for match in DOC_LINK.finditer(text):
      page, anchor = match.group(1), match.group(2)
      page_path = os.path.join(ROOT, "docs", page)
      where = f"{os.path.relpath(path, ROOT)}: {match.group(0)}"
      if not os.path.isfile(page_path):
        broken.append(f"{where} (no such page)")
        continue
      if anchor is not None:
        if page_path not in cache:
          cache[page_path] = _anchors(page_path)
        if anchor not in cache[page_path]:
          broken.append(f"{where} (no such heading)")
  assert not broken, "broken docs links:\n" + "\n".join(broken)
