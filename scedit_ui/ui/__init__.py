"""The Gradio app: one thin module per tab, wired together by `app_builder.build_app`."""
