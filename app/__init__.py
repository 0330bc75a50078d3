"""The browser app (Gradio UI + persisted conversations). It talks to the model through a small backend
interface and never imports torch: only blip2/ touches torch."""
