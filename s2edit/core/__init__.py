"""The ground floor of the S2Edit system: model families behind one interface (`family`, `stable_diffusion`,
`loading` and the random `presets/`), the offline tokenizer, attention processors and controllers,
schedules and samplers, the guided denoiser, the denoising loop with its hooks, the typed settings, the
Trainer factory and the runtime choices. It imports no other stage."""
