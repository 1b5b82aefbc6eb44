"""WIT curation before download: query list, candidates, text filters, matching, balancing (Ray Data)."""
