"""One module per verb of the `neo` command. Each `main(cfg)` resolves its config once
(train/config/resolve.py) and runs what it resolved; nothing else imports a verb."""
