"""Crawling url+caption rows into image-text shards: fetch, image checks, dedupe, shard writing."""
