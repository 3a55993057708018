"""Learning from AI feedback: judges' configuration, sampling answers, labelling pairs offline."""
