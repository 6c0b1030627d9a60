"""`verispec batch`: offline jobs over a JSONL file of requests, in the OpenAI Batch API's format.

- `jsonl.py`: the file format (request lines in, result lines out) and the resume bookkeeping;
- `prepare.py`: a request line to the engine's input, validated by the server's own request models;
- `job.py`: one engine running request lines to result lines;
- `ray_job.py`: the same spread over Ray Data actors, the driver writing every line;
- `summary.py`: what a job did (counts, tokens, acceptance, speedup) and its progress bar;
- `command.py`: the command line, and the order of things: read, resume, run, summarise.
"""
