// Runs the cuda target's token draws (targets/cuda/sample.py) under the CPU emulation of tests/cuda_emu.h.
// usage: sample_emu DIR B T V — reads DIR/{logits,temp,key}.bin, writes DIR/tok.bin; threads a row: -DKNT.
#include "cuda_emu.h"
#include KILN_KERNEL_SOURCE

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 5) return 2;
  const std::string dir = argv[1];
  const long long B = std::atoll(argv[2]), T = std::atoll(argv[3]);
  const int V = std::atoi(argv[4]);
  auto logits = emu_load<float>(dir + "/logits.bin", B * T * V);
  auto temp = emu_load<float>(dir + "/temp.bin", B);
  auto key = emu_load<int>(dir + "/key.bin", B);
  std::vector<int> tok(B, -7);  // every row must be written
  emu_launch((int)B, 1, KNT, [&] { kiln_sample<KNT>(logits.data(), temp.data(), key.data(), tok.data(), T, V, (int)blockIdx.x); });
  FILE* f = std::fopen((dir + "/tok.bin").c_str(), "wb");
  std::fwrite(tok.data(), sizeof(int), tok.size(), f);
  std::fclose(f);
  return 0;
}
