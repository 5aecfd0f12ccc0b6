// Runs kiln's fused prefill attention (targets/cuda/flash.py) under the CPU emulation of tests/cuda_emu.h.
// usage: flash_emu DIR B T P MP SCALE_LOG2 — reads DIR/{q,cache,pt,pos}.bin, writes DIR/o.bin;
// the kernel's template arguments come as -DKD, -DKREP, -DKKVH, -DKPAGE, -DKWIN, its shared memory in bytes
// as -DKSMEM.
#include "cuda_emu.h"
#include KILN_KERNEL_SOURCE

#include <cstdio>
#include <cstdlib>
#include <string>

int main(int argc, char** argv) {
  if (argc != 7) return 2;
  const std::string dir = argv[1];
  const long long B = std::atoll(argv[2]), T = std::atoll(argv[3]), P = std::atoll(argv[4]), MP = std::atoll(argv[5]);
  const float scale_log2 = std::strtof(argv[6], nullptr);
  const long long H = (long long)KREP * KKVH;
  auto q = emu_load<float>(dir + "/q.bin", B * H * T * KD);
  auto cache = emu_load<half>(dir + "/cache.bin", P * 2 * KKVH * KPAGE * KD);
  auto pt = emu_load<int>(dir + "/pt.bin", B * MP);
  auto pos = emu_load<int>(dir + "/pos.bin", B * T);
  std::vector<float> o(B * H * T * KD, -7.0f);  // rows the kernel must write start as garbage
  // the block's dynamic shared memory: the size the launch gives (KSMEM, from flash.py), then a guard band the
  // kernel must not touch; it starts as garbage too
  constexpr int guard = 4096;
  std::vector<unsigned char> smem(KSMEM + guard, 0xa5);
  if (kiln_fa_smem_bytes(KD) != KSMEM) {
    std::fprintf(stderr, "device code lays out %d bytes of shared memory, the launch gives %d\n",
                 kiln_fa_smem_bytes(KD), KSMEM);
    return 3;
  }
  const int gx = (int)((KREP * T + kiln_fa_bm - 1) / kiln_fa_bm), gy = (int)(B * KKVH);
  emu_launch(gx, gy, 128, [&] {
    kiln_flash<KD, KREP, KKVH, KPAGE, KWIN>(q.data(), cache.data(), pt.data(), pos.data(), o.data(), T, MP,
                                             scale_log2, (int)blockIdx.x, (int)blockIdx.y, (half*)smem.data());
  });
  for (int i = KSMEM; i < KSMEM + guard; ++i)
    if (smem[i] != 0xa5) {
      std::fprintf(stderr, "shared memory written at byte %d, past the %d the launch gives\n", i, KSMEM);
      return 4;
    }
  FILE* f = std::fopen((dir + "/o.bin").c_str(), "wb");
  std::fwrite(o.data(), sizeof(float), o.size(), f);
  std::fclose(f);
  return 0;
}
