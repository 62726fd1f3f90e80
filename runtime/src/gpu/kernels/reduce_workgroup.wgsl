// gemv.wgsl's entry point on any device: the 64 lanes' partial sums of each column are added by a tree in workgroup
// memory, one column of the group at a time (M x 256 values, 8 KiB).

var<workgroup> red: array<f32, 2048>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let lane = lid % LANES;
    let c0 = gemv_first_column(wid.x + wid.y * nwg.x, lid);
    let acc = gemv_dot(c0, lane);
    for (var j = 0u; j < CPT; j++) {
        for (var r = 0u; r < M; r++) {
            red[r * 256u + lid] = acc[r][j];
        }
        workgroupBarrier();
        for (var s = LANES / 2u; s > 0u; s >>= 1u) {
            if (lane < s) {
                for (var r = 0u; r < M; r++) {
                    red[r * 256u + lid] += red[r * 256u + lid + s];
                }
            }
            workgroupBarrier();
        }
        // Lane r of the group writes row r's sum.
        if (lane < M && c0 + j < params.n) {
            store_output(lane, c0 + j, red[lane * 256u + lid - lane]);
        }
        workgroupBarrier();
    }
}
