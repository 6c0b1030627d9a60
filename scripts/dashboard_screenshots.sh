#!/usr/bin/env bash
# Dashboard screenshots with real data: a server, Prometheus scraping it, load phases, then the render.
# Needs Debian's prometheus package (apt-get install prometheus). Writes /tmp/dashrun/png/*.png.
mkdir -p /tmp/dashrun
set -x
cd /tmp/dashrun
OMP_NUM_THREADS=1 verispec serve --port 8200 --proposer draft --mismatch-sample-rate 1 --max-running 4 --max-waiting 4 > serve.log 2>&1 &
SERVER=$!
cat > prometheus.yml <<'EOC'
global: {scrape_interval: 2s, evaluation_interval: 2s}
rule_files: [/work/main/deploy/prometheus/alerts.yml]
scrape_configs:
  - job_name: verispec
    static_configs: [{targets: ["127.0.0.1:8200"]}]
EOC
prometheus --config.file=prometheus.yml --storage.tsdb.path=/tmp/dashrun/data --web.listen-address=127.0.0.1:9090 > prom.log 2>&1 &
PROM=$!
until curl -sf localhost:8200/readyz >/dev/null; do sleep 2; done
sleep 6
START=$(date -u +%FT%TZ); U=http://127.0.0.1:8200
verispec loadtest --url $U --warmup 0 --concurrency 3 --requests 24 --max-tokens 48
verispec loadtest --url $U --warmup 0 --concurrency 3 --requests 24 --max-tokens 48 --compare-speculation --rounds 2
for i in 1 2 3; do curl -s -o /dev/null -X POST $U/v1/completions -H 'content-type: application/json' -d '{"prompt": 5, "max_tokens": "x"}'; done
verispec loadtest --url $U --warmup 0 --concurrency 12 --requests 24 --max-tokens 48
verispec loadtest --url $U --warmup 0 --concurrency 3 --requests 24 --max-tokens 48
sleep 20
END=$(date -u +%FT%TZ)
cd /work/main && python scripts/render_dashboards.py --prometheus http://127.0.0.1:9090 --start $START --end $END --scrape-interval 15s --out /tmp/dashrun/png deploy/grafana/*.json
echo "$START $END" > /tmp/dashrun/window
kill $PROM $SERVER
