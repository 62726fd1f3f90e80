// The second pass of a split-K linear layer: output (r, c) = the sum of its params.splits partial sums, then the
// epilogue (bias, activation, placement, residual add). One thread per output element.

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let i = (wid.x + wid.y * nwg.x) * 256u + lid;
    let count = params.m * params.n;
    if (i >= count) {
        return;
    }
    var sum = 0.0;
    for (var s = 0u; s < params.splits; s++) {
        sum += partial[s * count + i];
    }
    store_output(i / params.n, i % params.n, sum);
}
