from services.common.stage_main import main
from services.gen.cfrseg.v1 import pseudolabel_pb2_grpc

if __name__ == "__main__":
    main("pseudolabel", "cfrseg.v1.PseudolabelService",
         pseudolabel_pb2_grpc.add_PseudolabelServiceServicer_to_server, "services.pseudolabel.stage:run")
