"""One job, in four steps: plan (every check, before any work) → embed → evaluate → record.
`cbir.run` calls them in that order; the sweep's shared pass plans and embeds many jobs at once."""
