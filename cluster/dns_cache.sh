#!/usr/bin/env bash
# A caching DNS resolver for this node (installed in the image as /usr/local/bin/clip-dns-cache; run as root
# by the crawl nodes' setup: cluster/aws.yaml's cpu_crawl worker_setup_commands, the cpu-crawl pods' postStart
# in cluster/kuberay.yaml).
#
# Why: a crawl resolves a new host name for a large share of its URLs, and every crawl worker on the node
# resolving through the VPC resolver on its own soon meets that resolver's per-interface packet limit (1,024
# packets/s on AWS) and its latency. dnsmasq is a small forwarding cache (no recursion of its own, so the
# authoritative servers see no more traffic than before): one cache for every worker on the node, answers in
# microseconds after the first lookup, negative answers cached too. The fetcher keeps its own per-process
# cache on top (pipelines/crawl/fetch.py).
#
# It keeps the search domains and options of /etc/resolv.conf (Kubernetes needs them), forwards to the
# nameservers listed there, and then lists only itself. Idempotent: a second run changes nothing.
set -euo pipefail
UPSTREAM=/etc/resolv.dnsmasq
if ! grep -q '^nameserver 127.0.0.1$' /etc/resolv.conf; then
  grep '^nameserver' /etc/resolv.conf > "$UPSTREAM"
fi
if ! pgrep -x dnsmasq > /dev/null; then
  dnsmasq --listen-address=127.0.0.1 --bind-interfaces --port=53 \
    --resolv-file="$UPSTREAM" --cache-size=10000 --dns-forward-max=1000 --neg-ttl=60 \
    --no-hosts --log-facility=/tmp/dnsmasq.log
fi
# /etc/resolv.conf may be a bind mount (Docker, Kubernetes): rewrite it in place, never replace the file.
{ grep -v '^nameserver' /etc/resolv.conf || true; echo 'nameserver 127.0.0.1'; } > /tmp/resolv.conf.new
cat /tmp/resolv.conf.new > /etc/resolv.conf
rm -f /tmp/resolv.conf.new
