"""Evaluation: question banks, interventions, the SAEBench unlearning score, CE/KL scores, controls."""
