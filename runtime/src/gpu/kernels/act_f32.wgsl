// Activation storage for f32 activations: the first part of every kernel module that reads or writes activations.
// Kernels declare activation buffers as array<act> / array<act4> and compute in f32 (f32(x[i]), act(v)).
alias act = f32;
alias act2 = vec2<f32>;
alias act4 = vec4<f32>;
