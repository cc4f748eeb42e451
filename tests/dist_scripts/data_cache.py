"""Two ranks prepare the same data: rank 0 (the node's builder) builds the cache once, rank 1
maps it; a bad file's error reaches both ranks. Rank 0 prints the gathered figures as JSON."""

import json
import sys

from trainer.core import distributed
from trainer.data import Columns, DataError, TokenSettings, parse_sources, prepare
from trainer.data import cache as cache_module
from tests.reference_collate import cached_rows
from trainer.core.tokenizer import load_tokenizer

model, good, bad, cache_dir = sys.argv[1:5]
distributed.init_distributed()
builds = []
real_build = cache_module.build
cache_module.build = lambda *a, **k: (builds.append(a[0]), real_build(*a, **k))[1]

tokenizer = load_tokenizer(model)
data = prepare(parse_sources(good), Columns(), tokenizer, TokenSettings(8, 12), cache_dir)
try:
    prepare(parse_sources(bad), Columns(), tokenizer, TokenSettings(8, 12), cache_dir)
    error = None
except DataError as err:
    error = str(err)

first = cached_rows(data.tables[0], range(5))["query_hash"]
gathered = distributed.gather_objects({"builds": builds.count(good), "rows": len(data), "first": first, "error": error})
if distributed.is_main():
    print(json.dumps({
        "builds": [g["builds"] for g in gathered],
        "rows": [g["rows"] for g in gathered],
        "first_hashes_equal": all(g["first"] == first for g in gathered),
        "errors": [g["error"] for g in gathered],
    }))
distributed.teardown()
