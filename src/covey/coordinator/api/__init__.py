"""OpenAI-compatible HTTP routes (thin) and the serving logic behind them."""
