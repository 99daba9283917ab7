"""The human side-by-side study: create a study from two generation outputs, serve it to annotators,
gather the paper's three-question votes, and compute majority-vote win rates."""
