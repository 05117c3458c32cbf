from lightning_ft.nn.bayesian import BayesianLinear, bayesian_kl, convert_to_bayesian, convert_to_plain

__all__ = ["BayesianLinear", "bayesian_kl", "convert_to_bayesian", "convert_to_plain"]
