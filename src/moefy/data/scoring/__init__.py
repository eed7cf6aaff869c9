"""Document scorers for the corpus filter: fluency (perplexity under a reference LM), a heuristic advertisement
score, and a fastText classifier. Higher always means "more likely to be dropped"."""
